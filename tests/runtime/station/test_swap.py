"""Model hot swap on a running service under load: verified first, swapped between two frames, every seq exactly
once on the broker, model_id changing exactly at the swaps; refused bundles leave the running model alone; rollback."""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.onnx_bundle import make_tiny_bundle
from tests.runtime.station.conftest import RunningStation, start_station, stop_station

SWAPS = 10


@pytest.fixture(scope="module")
def swap_station(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[RunningStation]:
    root = tmp_path_factory.mktemp("swap")
    bundles = root / "bundles"
    shutil.copytree(tiny_bundle, bundles / "seed0")
    make_tiny_bundle(bundles / "seed1", seed=1)
    shutil.copytree(bundles / "seed1", bundles / "tampered")
    teacher = bundles / "tampered" / "teacher.onnx"
    data = bytearray(teacher.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the weights: the sha256 in the manifest no longer matches
    teacher.write_bytes(bytes(data))
    st = start_station(root, bundles / "seed0", max_fps=25, bundles_dir=str(bundles))
    yield st
    stop_station(st)


def _results(st: RunningStation) -> list[dict]:
    return [json.loads(p) for p in st.mqtt.on("/cam1/result")]


def _model(st: RunningStation, c) -> dict:  # type: ignore[no-untyped-def]
    return c.get("/api/models").json()


def test_ten_swaps_under_load_lose_and_duplicate_nothing(swap_station: RunningStation) -> None:
    st = swap_station
    ids = {"seed0": "tiny-rd-s64-seed0", "seed1": "tiny-rd-s64-seed1"}
    with st.client("erik") as c:
        st.wait(lambda: len(_results(st)) > 10, what="verdicts flowing")
        for i in range(SWAPS):
            target = "seed1" if i % 2 == 0 else "seed0"
            r = c.post("/api/models/swap", json={"name": target})
            assert r.status_code == 200, r.text
            st.wait(lambda: _model(st, c)["state"] == "idle", 30, "the swap")  # noqa: B023
            assert _model(st, c)["model_id"] == ids[target] and _model(st, c)["last_error"] is None
            st.wait(lambda: _results(st)[-1]["model_id"] == ids[target], what="a verdict of the new model")  # noqa: B023
        last = c.get("/api/live").json()["cameras"]["cam1"]["last"]["seq"]
        st.wait(lambda: max(r["seq"] for r in _results(st)) >= last, what="every verdict on the broker")
        entries = c.get("/api/audit", params={"action": "model_swap"}).json()["entries"]
    results = [r for r in _results(st) if r["seq"] <= last]
    counts = collections.Counter(r["seq"] for r in results)
    assert sorted(counts) == list(range(1, last + 1)), "a seq is missing"
    assert max(counts.values()) == 1, [s for s, n in counts.items() if n > 1]
    by_seq = [r["model_id"] for r in sorted(results, key=lambda r: r["seq"])]
    changes = [i for i in range(1, len(by_seq)) if by_seq[i] != by_seq[i - 1]]
    assert len(changes) == SWAPS
    assert by_seq[0] == ids["seed0"] and by_seq[-1] == ids["seed0"]  # an even number of swaps ends where it began
    assert all(r["threshold"] > 0 for r in results)
    assert len(entries) >= SWAPS and entries[0]["new"] == ids["seed0"] and entries[0]["old"] == ids["seed1"]
    status = [json.loads(p) for p in st.mqtt.on("line1/model")]
    assert len(status) >= SWAPS and status[-1]["model_id"] == ids["seed0"]


def test_a_tampered_bundle_is_refused_and_the_model_keeps_running(swap_station: RunningStation) -> None:
    st = swap_station
    with st.client("erik") as c:
        before = _model(st, c)["model_id"]
        n = len(_results(st))
        assert c.post("/api/models/swap", json={"name": "tampered"}).status_code == 200
        st.wait(lambda: _model(st, c)["state"] == "idle", 30, "the verification")
        m = _model(st, c)
        assert m["model_id"] == before and "sha256" in m["last_error"] and "teacher.onnx" in m["last_error"]
        st.wait(lambda: len(_results(st)) > n + 5, what="verdicts still flowing")
        assert {r["model_id"] for r in _results(st)[n:]} == {before}
        e = c.get("/api/audit", params={"action": "model_swap_refused"}).json()["entries"][0]
        assert e["target"] == "tampered" and e["user"] == "erik"


def test_rollback_and_refusals(swap_station: RunningStation) -> None:
    st = swap_station
    with st.client("olga") as c:
        assert c.post("/api/models/swap", json={"name": "seed1"}).status_code == 403
        assert c.post("/api/models/rollback").status_code == 403
    with st.client("erik") as c:
        for name in ["../seed1", "nope", "/etc", "seed1/../seed0"]:
            assert c.post("/api/models/swap", json={"name": name}).status_code == 404, name
        start = _model(st, c)["model_id"]
        assert c.post("/api/models/swap", json={"name": "seed1"}).status_code == 200
        st.wait(lambda: _model(st, c)["state"] == "idle", 30, "the swap")
        assert _model(st, c)["model_id"] == "tiny-rd-s64-seed1"
        assert c.post("/api/models/rollback").status_code == 200
        st.wait(lambda: _model(st, c)["state"] == "idle", 30, "the rollback")
        assert _model(st, c)["model_id"] == start
        doc = json.loads((st.cfg.ui.state_dir / "active_bundle.json").read_text())
        assert doc["model_id"] == start and doc["previous"].endswith("seed1")
