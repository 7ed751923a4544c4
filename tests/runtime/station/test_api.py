"""Station HTTP API against a real running service (uvicorn on loopback, real mosquitto, tiny ONNX bundle).

Refusals: wrong password, rate limit, missing CSRF token, operator doing an engineer/admin action, path traversal in
archive names, oversized / non-JSON bodies -- each a clear status and message, and nothing changed.
"""

from __future__ import annotations

import json

import cv2
import httpx
import numpy as np

from tests.runtime.station.conftest import PASSWORDS, RunningStation


def _live(c: httpx.Client) -> dict:
    r = c.get("/api/live")
    assert r.status_code == 200, r.text
    return r.json()


def _audit_actions(st: RunningStation) -> list[tuple[str, str]]:
    with st.client("erik") as c:
        return [(e["user"], e["action"]) for e in c.get("/api/audit", params={"limit": 10000}).json()["entries"]]


def _archived_ng(st: RunningStation, c: httpx.Client) -> dict:
    items: list[dict] = []

    def have() -> bool:
        items[:] = c.get("/api/archive", params={"verdict": "NG", "review": "none"}).json()["items"]
        return bool(items)

    st.wait(have, 20, "an NG frame in the archive")
    return items[0]


def test_live_view_updates_with_scored_frames(station: RunningStation) -> None:
    with station.client("olga") as c:
        station.wait(lambda: (_live(c)["cameras"]["cam1"]["last"] or {}).get("seq") is not None, what="a verdict")
        a = _live(c)["cameras"]["cam1"]
        station.wait(lambda: _live(c)["cameras"]["cam1"]["last"]["seq"] > a["last"]["seq"] + 5, what="more verdicts")
        doc = _live(c)
        cam = doc["cameras"]["cam1"]
        assert doc["broker"] == "connected" and cam["state"] == "up"
        assert doc["latency_ms"]["p50"] > 0 and doc["latency_ms"]["p99"] >= doc["latency_ms"]["p50"]
        assert cam["total"]["ok"] + cam["total"]["ng"] >= cam["last"]["seq"] - 1
        assert 0 < cam["fps"] <= 10
        # at most live_fps (5/s) frames are encoded; the others are only counted
        assert cam["frames_encoded"] < cam["total"]["ok"] + cam["total"]["ng"]
        r = c.get("/api/live/cam1.jpg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (96, 128, 3)  # the frame as grabbed, heatmap blended over it
        assert c.get("/api/live/nope.jpg").status_code == 404


def test_pages_need_login(station: RunningStation) -> None:
    with station.client() as c:
        r = c.get("/live")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert c.get("/api/live").status_code == 401
        assert c.get("/api/archive").status_code == 401
        r = c.get("/login")
        assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]


def test_wrong_password_is_refused_then_rate_limited(station: RunningStation) -> None:
    before = _audit_actions(station)
    with station.client() as c:
        for _ in range(station.cfg.ui.login_max_failures):
            r = c.post("/api/login", json={"user": "rita", "password": "not-it"})
            assert r.status_code == 401 and r.json()["detail"] == "wrong user name or password"
            assert "rdedge_session" not in r.headers.get("set-cookie", "")
        r = c.post("/api/login", json={"user": "rita", "password": PASSWORDS["rita"]})  # right, but too late
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "rdedge_session" not in r.headers.get("set-cookie", "")
        assert c.get("/api/live").status_code == 401
        r = c.post("/api/login", json={"user": "nobody", "password": "x" * 10})
        assert r.status_code == 401
    after = _audit_actions(station)
    fails = [a for a in after[: len(after) - len(before)] if a == ("rita", "login_failed")]
    assert len(fails) == station.cfg.ui.login_max_failures


def test_missing_or_wrong_csrf_token_changes_nothing(station: RunningStation) -> None:
    sidecar = station.cfg.ui.state_dir / "threshold.json"
    before = sidecar.read_bytes() if sidecar.exists() else None
    with station.client("erik") as c:
        token = c.headers.pop("X-CSRF-Token")
        r = c.post("/api/threshold", json={"value": 1.0})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = c.post("/api/threshold", json={"value": 1.0}, headers={"X-CSRF-Token": token[:-2] + "xx"})
        assert r.status_code == 403
        r = c.post("/api/counters/reset", json={"scope": "total"})
        assert r.status_code == 403
    assert (sidecar.read_bytes() if sidecar.exists() else None) == before
    assert ("erik", "threshold") not in _audit_actions(station)[:3]


def test_operator_cannot_do_engineer_or_admin_actions(station: RunningStation) -> None:
    sidecar = station.cfg.ui.state_dir / "threshold.json"
    before = sidecar.read_bytes() if sidecar.exists() else None
    with station.client("olga") as c:
        for method, url, body in [("POST", "/api/threshold", {"value": 0.5}),
                                  ("POST", "/api/counters/reset", {"scope": "total"}),
                                  ("POST", "/api/users", {"name": "eve", "role": "admin", "password": "x" * 12}),
                                  ("GET", "/api/users", None), ("GET", "/api/audit", None)]:  # fmt: skip
            r = c.request(method, url, json=body)
            assert r.status_code == 403, (url, r.text)
            assert "needs the" in r.json()["detail"] and "olga is operator" in r.json()["detail"]
        assert c.get("/threshold").status_code == 403
    assert (sidecar.read_bytes() if sidecar.exists() else None) == before
    with station.client("ada") as c:
        assert "eve" not in {u["name"] for u in c.get("/api/users").json()["users"]}


def test_path_traversal_in_archive_names_is_refused(station: RunningStation) -> None:
    labelled = station.cfg.ui.archive.labelled_dir
    assert labelled is not None
    files = lambda: sorted(labelled.rglob("*")) if labelled.exists() else []  # noqa: E731
    before = files()
    with station.client("olga") as c:
        item = _archived_ng(station, c)
        for name, kind in [("..%2F..%2Fstate%2Fusers.sqlite3", "jpg"), ("..", "png"), ("%2Fetc%2Fpasswd", "jpg"),
                           (item["name"], "..%2F..%2Fstate%2Fusers.sqlite3"), (item["name"], "json"),
                           ("0000000000000_cam1_999999", "png"), (item["name"] + "%00", "jpg")]:  # fmt: skip
            r = c.get(f"/api/archive/{name}/{kind}")
            assert r.status_code == 404, (name, kind, r.status_code)
            assert b"SQLite" not in r.content
        for name in ["..%2F..%2Fstate%2Fusers", "../../x", "0000000000000_cam1_1"]:
            r = c.post(f"/api/archive/{name}/review", json={"label": "confirmed_defect"})
            assert r.status_code == 404, (name, r.text)
        r = c.post(f"/api/archive/{item['name']}/review", json={"label": "../../etc"})
        assert r.status_code == 422
        assert c.get(f"/api/archive/{item['name']}/png").status_code == 200  # the real one is served
    assert files() == before


def test_oversized_and_non_json_bodies_are_refused(station: RunningStation) -> None:
    sidecar = station.cfg.ui.state_dir / "threshold.json"
    before = sidecar.read_bytes() if sidecar.exists() else None
    with station.client("erik") as c:
        big = json.dumps({"value": 1.0, "pad": "x" * (station.cfg.ui.max_request_kb * 1024)})
        r = c.post("/api/threshold", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "KiB" in r.json()["detail"]

        def chunks():  # no Content-Length: streamed
            yield b'{"value": 1.0}'

        r = c.post("/api/threshold", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 411
        r = c.post(
            "/api/threshold", content=b"value=1.0", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert r.status_code == 415
        r = c.post("/api/threshold", json={"value": 1.0, "extra": 1})
        assert r.status_code == 422
        r = c.post("/api/threshold", json={"value": -1})
        assert r.status_code == 422
    assert (sidecar.read_bytes() if sidecar.exists() else None) == before


def test_review_copies_the_raw_frame_into_the_labelled_layout(station: RunningStation) -> None:
    ui = station.cfg.ui.archive
    assert ui.good_dir is not None and ui.labelled_dir is not None
    with station.client("olga") as c:
        item = _archived_ng(station, c)
        name = item["name"]
        raw = c.get(f"/api/archive/{name}/png").content
        r = c.post(f"/api/archive/{name}/review", json={"label": "false_reject"})
        assert r.status_code == 200 and r.json() == {"name": name, "old": None, "label": "false_reject"}
        assert (ui.good_dir / f"{name}.png").read_bytes() == raw
        assert (ui.labelled_dir / "good" / f"{name}.png").read_bytes() == raw
        listed = c.get("/api/archive", params={"review": "false_reject"}).json()["items"]
        assert name in {m["name"] for m in listed}
        r = c.post(f"/api/archive/{name}/review", json={"label": "confirmed_defect"})
        assert r.json()["old"] == "false_reject"
        assert (ui.labelled_dir / "defect" / f"{name}.png").read_bytes() == raw
        assert not (ui.labelled_dir / "good" / f"{name}.png").exists()
        assert not (ui.good_dir / f"{name}.png").exists()
        decoded = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (96, 128, 3)  # the frame itself (lossless), not the overlay
    with station.client("erik") as c:
        entries = c.get("/api/audit", params={"action": "review"}).json()["entries"]
    mine = [e for e in entries if e["target"] == name]
    assert [(e["old"], e["new"], e["user"]) for e in mine] == [
        ("false_reject", "confirmed_defect", "olga"), (None, "false_reject", "olga")]  # fmt: skip

    def published() -> bool:
        docs = [json.loads(p) for p in station.mqtt.on("/audit")]
        return any(d["action"] == "review" and d["target"] == name and d["new"] == "confirmed_defect" for d in docs)

    station.wait(published, what="the review on rdedge/line1/audit")


def test_threshold_apply_takes_effect_without_restart(station: RunningStation) -> None:
    with station.client("erik") as c:
        doc = c.get("/api/threshold").json()
        old = doc["threshold"]
        assert doc["scores"] and doc["preview"]["frames"] == len(doc["scores"]) >= 1
        new = round(old * 1.01, 6)
        p = c.get("/api/threshold/preview", params={"value": new}).json()
        assert p["ok"] + p["ng"] == p["frames"]
        r = c.post("/api/threshold", json={"value": new})
        assert r.status_code == 200 and r.json()["old"] == old
        station.wait(lambda: _live(c)["threshold"] == new, 20, "the new threshold in force")
        # every verdict after the swap carries it, and the service said so on MQTT (retained)
        station.wait(lambda: _live(c)["cameras"]["cam1"]["last"]["threshold"] == new, 20, "a verdict with it")

        def status() -> bool:
            docs = [json.loads(x) for x in station.mqtt.on("line1/threshold")]
            return any(d["threshold"] == new and d["previous"] == old and d["by"] == "erik" for d in docs)

        station.wait(status, 20, "rdedge/line1/threshold")
        results = lambda: [json.loads(x) for x in station.mqtt.on("cam1/result")]  # noqa: E731
        station.wait(lambda: any(r["threshold"] == round(new, 6) for r in results()), 20, "a result with it")
        first = min(r["seq"] for r in results() if r["threshold"] == round(new, 6))
        assert all(r["threshold"] == round(new, 6) for r in results() if r["seq"] >= first)  # switched once, for good
        assert all(r["threshold"] == round(old, 6) for r in results() if r["seq"] < first)
        entry = c.get("/api/audit", params={"action": "threshold"}).json()["entries"][0]
        assert (entry["user"], entry["old"], entry["new"]) == ("erik", old, new)
        assert json.loads((station.cfg.ui.state_dir / "threshold.json").read_text())["threshold"] == new


def test_counter_reset_is_audited(station: RunningStation) -> None:
    with station.client("erik") as c:
        station.wait(lambda: _live(c)["cameras"]["cam1"]["shift"]["ok"] + _live(c)["cameras"]["cam1"]["shift"]["ng"]
                     > 3, what="frames counted")  # fmt: skip
        before = _live(c)["cameras"]["cam1"]
        r = c.post("/api/counters/reset", json={"camera": "cam1", "scope": "shift"})
        assert r.status_code == 200
        old = r.json()["reset"]["cam1"]
        assert old["ok"] + old["ng"] >= before["shift"]["ok"] + before["shift"]["ng"]
        after = _live(c)["cameras"]["cam1"]
        assert after["shift"]["ok"] + after["shift"]["ng"] < old["ok"] + old["ng"]
        assert after["total"]["ok"] + after["total"]["ng"] >= before["total"]["ok"] + before["total"]["ng"]
        e = c.get("/api/audit", params={"action": "reset_shift_counters"}).json()["entries"][0]
        assert e["user"] == "erik" and e["target"] == "cam1" and e["old"] == {"cam1": old}
        assert c.post("/api/counters/reset", json={"camera": "nope"}).status_code == 404


def test_admin_manages_users(station: RunningStation) -> None:
    with station.client("ada") as c:
        r = c.post("/api/users", json={"name": "tom", "role": "operator", "password": "tom-password"})
        assert r.status_code == 200
        with station.client() as t:
            assert t.post("/api/login", json={"user": "tom", "password": "tom-password"}).status_code == 200
            assert t.get("/api/live").status_code == 200
            assert c.delete("/api/users/tom").status_code == 200
            assert t.get("/api/live").status_code == 401  # the session ends with the user
        assert c.delete("/api/users/ada").status_code == 422
        r = c.post("/api/users", json={"name": "x", "role": "root", "password": "x" * 10})
        assert r.status_code == 422


def test_metrics_endpoint(station: RunningStation) -> None:
    with httpx.Client(base_url=station.url) as c:
        station.wait(lambda: 'rdedge_frames_total{camera="cam1"' in c.get("/metrics").text, what="frame counters")
        text = c.get("/metrics").text
    assert 'rdedge_camera_up{camera="cam1",state="up"} 1.0' in text
    assert "rdedge_broker_connected 1.0" in text
    assert 'rdedge_inference_seconds_count{camera="cam1"}' in text
    assert "rdedge_archive_dropped" in text and "rdedge_spool_depth" in text


def test_teach_collects_good_frames_and_shows_the_commands(station: RunningStation) -> None:
    teach_dir = station.cfg.ui.state_dir / "teach"
    with station.client("olga") as c:
        assert c.post("/api/teach/collect", json={"camera": "cam1", "n": 3, "name": "x"}).status_code == 403
    with station.client("erik") as c:
        for body, code in [({"camera": "nope", "n": 3, "name": "p1"}, 404),
                           ({"camera": "cam1", "n": 3, "name": "../../etc"}, 422),
                           ({"camera": "cam1", "n": 0, "name": "p1"}, 422)]:  # fmt: skip
            assert c.post("/api/teach/collect", json=body).status_code == code, body
        assert not teach_dir.exists() or not any(teach_dir.rglob("*.png"))
        assert c.post("/api/teach/train").status_code == 409  # nothing collected yet
        r = c.post("/api/teach/collect", json={"camera": "cam1", "n": 4, "name": "part-a", "interval_s": 0.2})
        assert r.status_code == 200 and r.json()["state"] == "collecting"
        assert c.post("/api/teach/collect", json={"camera": "cam1", "n": 4, "name": "part-b"}).status_code == 409
        station.wait(lambda: c.get("/api/teach").json()["state"] == "collected", 20, "4 frames collected")
        doc = c.get("/api/teach").json()
        good = sorted((teach_dir / "part-a" / "train" / "good").glob("*.png"))
        assert [p.name for p in good] == ["00000.png", "00001.png", "00002.png", "00003.png"]
        assert cv2.imread(str(good[0])).shape == (96, 128, 3)
        train, export = doc["commands"]
        assert f"train --data {teach_dir / 'part-a'}" in train and "--image-size 256" in train
        assert f"--out {station.cfg.ui.state_dir / 'bundles' / 'part-a'}" in export
        again = c.post("/api/teach/collect", json={"camera": "cam1", "n": 2, "name": "part-a"})
        assert again.status_code == 409 and "already exists" in again.json()["detail"]
        e = c.get("/api/audit", params={"action": "teach_collect"}).json()["entries"][0]
        assert e["user"] == "erik" and e["target"] == "part-a" and e["new"] == {"camera": "cam1", "n": 4}
