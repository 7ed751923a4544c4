"""The runtime as a real subprocess (``rdedge run``) against a real mosquitto, on the tiny real ONNX bundle."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    Runtime,
    make_folder,
    make_video,
    results,
    scored_in_log,
    wait_until,
    write_config,
)
from tests.mqtt_broker import Broker, Collector

RESULT_KEYS = {"seq", "device", "camera", "frame_seq", "frame_ts", "ts", "score", "threshold", "verdict",
               "latency_ms", "model_id"}  # fmt: skip


def _check_results(docs: list[dict[str, Any]], expected_seqs: set[int]) -> None:
    seqs = [d["seq"] for d in docs]
    assert set(seqs) == expected_seqs, f"missing {sorted(expected_seqs - set(seqs))}, extra {set(seqs) - expected_seqs}"
    for d in docs:
        assert set(d) >= RESULT_KEYS, d
        assert d["verdict"] in ("OK", "NG") and d["device"] == "dev1"
        assert (d["verdict"] == "NG") == (d["score"] >= d["threshold"])
        assert {"preprocess", "total", "frame_to_result"} <= set(d["latency_ms"])


def _spool_depth(path: Path, topic_like: str = "%") -> int:
    """Rows in the runtime's spool (results and alerts; ``topic_like`` filters)."""
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox WHERE topic LIKE ?", (topic_like,)).fetchone()[0])
    except sqlite3.OperationalError:  # created but the schema is not there yet
        return 0


def test_folder_source_every_seq_arrives_then_stopped(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    folder = make_folder(tmp_path / "imgs", 20)
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db",
                       [{"name": "cam1", "source": {"kind": "folder", "path": str(folder)}}])  # fmt: skip
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert rt.wait(30) == 0, rt.log()
    assert col.wait_for(lambda: len(results(col)) >= 20 and col.on("t/dev1/status")[-1:] == [b"stopped"], 5)
    docs = results(col)
    _check_results(docs, set(range(1, 21)))
    assert [d["seq"] for d in docs] == list(range(1, 21))  # one connection: in order
    assert [d["frame_seq"] for d in docs] == list(range(20))  # lossless folder: every image exactly once
    alerts = [json.loads(p) for p in col.on("/cam1/alert")]
    assert [a["seq"] for a in alerts] == [d["seq"] for d in docs if d["verdict"] == "NG"]
    assert 0 < len(alerts) < 20  # the tiny bundle's threshold splits random images
    assert col.on("t/dev1/status")[0] == b"online"
    assert b"ended" in col.on("t/dev1/cam1/status")
    assert "summary: 20 frame(s) scored" in rt.log()
    assert _spool_depth(tmp_path / "spool.db") == 0
    col.close()


def test_video_source_with_alert_images_and_stats(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    video = make_video(tmp_path / "v.avi", 15)
    cams = [{"name": "cam1", "source": {"kind": "video", "path": str(video), "realtime": False}, "max_fps": 10}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    doc = __import__("yaml").safe_load(cfg.read_text())
    doc["alerts"] = {"save_dir": str(tmp_path / "ng"), "publish_image": True}
    cfg.write_text(__import__("yaml").safe_dump(doc))
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert rt.wait(30) == 0, rt.log()
    assert col.wait_for(lambda: col.on("t/dev1/status")[-1:] == [b"stopped"], 5)
    docs = results(col)
    n = scored_in_log(rt.log())
    assert n >= 10  # paced at 10/s: a frame may be replaced before it is taken (counted in frames_dropped)
    _check_results(docs, set(range(1, n + 1)))
    ng = [d for d in docs if d["verdict"] == "NG"]
    images = col.on("/cam1/alert/image")
    assert len(images) == len(ng) and all(img[:2] == b"\xff\xd8" for img in images)  # JPEG SOI
    alerts = [json.loads(p) for p in col.on("/cam1/alert")]
    assert all(Path(a["image_path"]).is_file() for a in alerts)
    stats = [json.loads(p) for p in col.on("t/dev1/stats")]
    assert stats, "no stats within the run"
    s = stats[-1]
    assert {"fps", "latency_ms", "frames_dropped", "spool", "uptime_s", "mqtt"} <= set(s)
    assert {"p50", "p99"} <= set(s["latency_ms"]["total"])
    col.close()


def test_broker_outage_mid_run_every_seq_arrives(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/dev1/+/result"], session="outage-checker")
    folder = make_folder(tmp_path / "imgs", 40)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder)}, "max_fps": 10}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert col.wait_for(lambda: len(results(col)) >= 5, 15), rt.log()
    broker.stop()
    time.sleep(3.0)  # the runtime keeps scoring into its spool
    assert _spool_depth(tmp_path / "spool.db") > 0
    broker.start()  # same port; the collector's persistent session queues what it misses while reconnecting
    assert rt.wait(30) == 0, rt.log()
    n = scored_in_log(rt.log())
    assert n >= 30  # paced at 10/s: under load a frame may be replaced before it is taken (counted)
    assert col.wait_for(lambda: {d["seq"] for d in results(col)} >= set(range(1, n + 1)), 15)
    _check_results(results(col), set(range(1, n + 1)))
    assert "MQTT disconnected" in rt.log() and "1 reconnect(s)" in rt.log()
    col.close()


def test_sigkill_with_backlog_then_restart_delivers_backlog(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    broker.stop()  # no broker: everything goes to the spool
    folder = make_folder(tmp_path / "imgs", 10)
    spool = tmp_path / "spool.db"
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder)}}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, spool, cams)
    rt = Runtime(cfg, tmp_path / "rt1.log")
    runtimes.append(rt)
    assert wait_until(lambda: _spool_depth(spool, "%/result") >= 10, 20), rt.log()
    rt.signal(signal.SIGKILL)
    rt.wait(5)
    broker.start()
    col = Collector(broker, ["t/dev1/+/result"])
    rt2 = Runtime(cfg, tmp_path / "rt2.log")
    runtimes.append(rt2)
    assert rt2.wait(30) == 0, rt2.log()
    assert col.wait_for(lambda: len(results(col)) >= 20, 5)
    docs = results(col)
    _check_results(docs, set(range(1, 21)))  # backlog 1..10 from the killed run, then 11..20
    assert [d["seq"] for d in docs][:10] == list(range(1, 11))  # backlog first, in order
    assert "next seq 11" in rt2.log()
    assert _spool_depth(spool) == 0
    col.close()


def test_sigterm_publishes_stopped_and_exits_quickly(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    folder = make_folder(tmp_path / "imgs", 10)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder), "loop": True}, "max_fps": 30}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert col.wait_for(lambda: len(results(col)) >= 10, 15), rt.log()
    t0 = time.monotonic()
    rt.signal(signal.SIGTERM)
    assert rt.wait(5) == 0, rt.log()
    took = time.monotonic() - t0
    assert took < 5.0
    assert col.wait_for(lambda: col.on("t/dev1/status")[-1:] == [b"stopped"], 3)
    last = max(d["seq"] for d in results(col))
    _check_results(results(col), set(range(1, last + 1)))  # flushed: nothing left behind
    assert _spool_depth(tmp_path / "spool.db") == 0
    assert "SIGTERM received" in rt.log()
    col.close()
    late = Collector(broker, ["t/dev1/status"])  # retained
    assert late.wait_for(lambda: late.on("status") == [b"stopped"], 3)
    late.close()


def test_sigterm_while_broker_down_still_exits_quickly(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    broker.stop()
    folder = make_folder(tmp_path / "imgs", 5)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder), "loop": True}, "max_fps": 30}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert wait_until(lambda: _spool_depth(tmp_path / "spool.db") >= 5, 20), rt.log()
    t0 = time.monotonic()
    rt.signal(signal.SIGTERM)
    assert rt.wait(5) == 0, rt.log()
    assert time.monotonic() - t0 < 5.0
    assert "still spooled at exit" in rt.log()


@pytest.mark.parametrize("damage", ["missing", "corrupt_manifest", "hash_mismatch"])
def test_bad_bundle_clear_error_nonzero_exit(
    tmp_path: Path, tiny_bundle: Path, damage: str, runtimes: list[Runtime]
) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    if damage != "missing":
        shutil.copytree(tiny_bundle, bundle)
    if damage == "corrupt_manifest":
        (bundle / "manifest.json").write_text('{"schema_version": 1, "model_id": ')
    elif damage == "hash_mismatch":
        data = bytearray((bundle / "teacher.onnx").read_bytes())
        data[-1] ^= 0xFF
        (bundle / "teacher.onnx").write_bytes(bytes(data))
    folder = make_folder(tmp_path / "imgs", 2)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder)}}]
    cfg = write_config(tmp_path / "c.yaml", bundle, None, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert rt.wait(20) == 1
    expected = {"missing": "bundle directory not found", "corrupt_manifest": "corrupt JSON",
                "hash_mismatch": "sha256 mismatch"}[damage]  # fmt: skip
    err_lines = [ln for ln in rt.log().splitlines() if "rdedge run: error:" in ln]
    assert len(err_lines) == 1 and expected in err_lines[0], rt.log()
    assert "Traceback" not in rt.log()


def test_two_cameras_round_robin_share_one_seq_series(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    cams = [
        {"name": "cam1", "source": {"kind": "folder", "path": str(make_folder(tmp_path / "imgs", 10))}},
        {
            "name": "cam2",
            "source": {"kind": "video", "path": str(make_video(tmp_path / "v.avi", 10)), "realtime": False},
        },  # fmt: skip
    ]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert rt.wait(30) == 0, rt.log()
    assert col.wait_for(lambda: col.on("t/dev1/status")[-1:] == [b"stopped"], 5)
    one, two = results(col, "cam1"), results(col, "cam2")
    assert len(one) == 10 and len(two) == 10  # unpaced sources: every frame of both, nothing dropped
    _check_results(one + two, set(range(1, 21)))
    assert {d["camera"] for d in one} == {"cam1"} and {d["camera"] for d in two} == {"cam2"}
    col.close()
