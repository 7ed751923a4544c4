"""Reliability faults on real parts (issue 10): broker ACL refusals, a camera absent at start, a full disk, trigger
floods. Each test runs ``rdedge run`` as a subprocess against a real mosquitto (or against a real small file system)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Runtime, make_folder, make_video, rdedge_cmd, results, wait_until, write_config
from tests.mqtt_broker import Broker, Collector, mosquitto_missing

REPO = Path(__file__).resolve().parents[2]

# Anonymous clients (the runtime and the collector) may read everything and write every device topic except results.
ACL_REFUSING_RESULTS = """\
topic read t/#
topic write t/dev1/status
topic write t/dev1/stats
topic write t/dev1/+/status
topic write t/dev1/+/alert
topic write t/dev1/+/error
"""
ACL_FIXED = "topic readwrite t/#\n"


def _spool_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    """``(seq, topic)`` rows of a spool table, read by a separate connection (the runtime keeps its own open)."""
    if not path.exists():
        return []
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return list(db.execute(f"SELECT seq, topic FROM {table} ORDER BY id").fetchall())
    except sqlite3.OperationalError:  # table (or schema) not there
        return []


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    """mosquitto whose ACL file refuses the device's result topic; rewrite the file and SIGHUP to change it."""
    why = mosquitto_missing()
    if why:
        pytest.skip(why)
    b = Broker(tmp_path / "aclbroker")
    acl = b.work_dir / "acl"
    acl.write_text(ACL_REFUSING_RESULTS)
    acl.chmod(0o644)
    with b.conf_path.open("a") as f:
        f.write(f"acl_file {acl}\n")
    b.start()
    yield b, acl
    b.stop()


def test_refused_verdicts_are_dead_lettered_logged_once_and_replayed_after_acl_fix(
    tmp_path: Path, tiny_bundle: Path, acl_broker: tuple[Broker, Path], runtimes: list[Runtime]
) -> None:
    broker, acl = acl_broker
    col = Collector(broker, ["t/#"])
    folder = make_folder(tmp_path / "imgs", 5)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder), "loop": True}, "max_fps": 10}]
    spool = tmp_path / "spool.db"
    # each refused probe makes mosquitto drop the connection: 2.5 s between probes leaves windows for stats
    cfg = write_config(
        tmp_path / "c.yaml", tiny_bundle, broker, spool, cams, refused_probe_s=2.5
    )  # connected windows for stats
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)

    # 1. the broker answers every result with PUBACK 135 Not authorized: the verdicts stay on disk, dead-lettered
    assert wait_until(lambda: len(_spool_rows(spool, "dead_letter")) >= 5, 20), rt.log()[-3000:]
    assert results(col) == []
    assert {t for _s, t in _spool_rows(spool, "dead_letter")} == {"t/dev1/cam1/result"}
    assert col.wait_for(lambda: any(json.loads(p)["spool"]["dead_letter"] >= 1 for p in col.on("t/dev1/stats")), 30)
    stats = json.loads(col.on("t/dev1/stats")[-1])
    assert stats["mqtt"]["refused_topics"] == {"t/dev1/cam1/result": "Not authorized (reason code 135)"}
    assert stats["spool"]["verdicts_fit"] > 0 and stats["spool"]["free_bytes"] > 0
    time.sleep(1.0)  # more refusals in the same streak
    refused = [ln for ln in rt.log().splitlines() if "REFUSES" in ln]
    assert len(refused) == 1, rt.log()[-3000:]  # loud, but once per streak
    assert "t/dev1/cam1/result" in refused[0] and "Not authorized" in refused[0] and "ERROR" in refused[0]

    # 2. status verb while the service runs
    st = subprocess.run([*rdedge_cmd(), "spool", "status", "--config", str(cfg)], capture_output=True, text=True,
                        timeout=60, cwd=REPO)  # fmt: skip
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["dead_letter"] >= 5 and doc["refused"][0]["topic"] == "t/dev1/cam1/result"

    # 3. fix the ACL (mosquitto re-reads it on SIGHUP), replay the dead letters into the running service
    acl.write_text(ACL_FIXED)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    assert col.wait_for(lambda: len(results(col)) >= 1, 10), rt.log()[-3000:]  # new verdicts pass again
    rep = subprocess.run([*rdedge_cmd(), "spool", "replay-dead", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    assert "moved back to the outbox" in rep.stdout and "Not authorized" in rep.stdout

    def complete() -> bool:
        seqs = {d["seq"] for d in results(col)}
        return bool(seqs) and seqs == set(range(1, max(seqs) + 1)) and len(seqs) >= 8

    assert col.wait_for(complete, 15), (sorted(d["seq"] for d in results(col)), rt.log()[-3000:])
    assert wait_until(lambda: _spool_rows(spool, "dead_letter") == [], 5)
    assert "accepts messages on t/dev1/cam1/result again" in rt.log()
    rt.signal(signal.SIGTERM)
    assert rt.wait(10) == 0, rt.log()[-3000:]
    col.close()


class _NotifySocket:
    """A real ``$NOTIFY_SOCKET``: a unix datagram socket bound in a short temp dir (sun_path is 108 bytes)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sdn"))
        self.path = self.dir / "n"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        try:
            while True:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
        except TimeoutError:
            pass
        return [m for _t, m in self.got]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_camera_absent_at_start_ready_watchdog_and_scores_once_it_appears(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    video = tmp_path / "later" / "cam.avi"  # does not exist at start
    cams = [{"name": "cam1", "source": {"kind": "video", "path": str(video), "realtime": False},
             "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0}]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    ns = _NotifySocket()
    try:
        rt = Runtime(cfg, tmp_path / "rt.log", env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "1000000"})
        runtimes.append(rt)
        assert wait_until(lambda: any("READY=1" in m for m in ns.drain()), 30), (ns.got, rt.log()[-3000:])
        ready_at = next(t for t, m in ns.got if "READY=1" in m)
        ready = next(m for _t, m in ns.got if "READY=1" in m)
        assert "cam1" in ready  # STATUS= names the camera and its state
        time.sleep(2.5)
        ns.drain()
        pings = [t for t, m in ns.got if m == "WATCHDOG=1" and t > ready_at]
        assert len(pings) >= 3, ns.got  # every 0.5 s while no frame comes
        assert col.wait_for(lambda: b"down" in col.on("t/dev1/cam1/status"), 5), col.messages
        assert results(col) == [] and rt.proc.poll() is None

        # the camera appears: the running service scores it without a restart
        tmp_video = make_video(tmp_path / "cam.avi", 6)
        video.parent.mkdir()
        os.replace(tmp_video, video)
        assert col.wait_for(lambda: len(results(col)) >= 6, 20), rt.log()[-3000:]
        assert b"up" in col.on("t/dev1/cam1/status")
        assert rt.wait(20) == 0, rt.log()[-3000:]  # the video ends: clean exit
    finally:
        ns.close()
    col.close()


def test_trigger_flood_in_flight_count_in_stats(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    col = Collector(broker, ["t/#"])
    folder = make_folder(tmp_path / "imgs", 4)
    cams = [{"name": "cam1", "mode": "triggered", "source": {"kind": "folder", "path": str(folder), "loop": True},
             "max_fps": 25}]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams, stats_interval_s=0.2)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert col.wait_for(lambda: b"online" in col.on("t/dev1/status"), 15), rt.log()
    time.sleep(0.3)  # trigger subscription in place
    n = 150
    for i in range(n):
        col.client.publish("t/dev1/cam1/trigger", json.dumps({"id": i}), qos=1)

    def answered() -> int:
        return len(results(col)) + len(col.on("/cam1/error"))

    assert col.wait_for(lambda: answered() >= n, 60), (answered(), rt.log()[-3000:])
    stats = [json.loads(p) for p in col.on("t/dev1/stats")]
    peak = max(s["triggers"]["in_flight"] for s in stats)
    assert 1 <= peak <= 64 + 1  # the queue (64) plus the one waiting for its frame
    full = [json.loads(p) for p in col.on("/cam1/error") if b"queue full" in p]
    assert col.wait_for(lambda: json.loads(col.on("t/dev1/stats")[-1])["triggers"]["in_flight"] == 0, 5)
    last = json.loads(col.on("t/dev1/stats")[-1])
    assert last["triggers"]["refused_queue_full"] == len(full)
    assert last["cameras"]["cam1"]["triggers_in_flight"] == 0
    assert {d["trigger_id"] for d in results(col)} | {e["id"] for e in full} == set(range(n))
    rt.signal(signal.SIGTERM)
    assert rt.wait(10) == 0
    col.close()


# -- full disk -------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root with CAP_SYS_ADMIN, as in this project's containers; skips otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _check_intact(spool: Path) -> list[int]:
    """The spool passes SQLite's integrity check and holds seq 1..N with no gap; returns the seqs."""
    with sqlite3.connect(spool, timeout=5) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [int(r[0]) for r in db.execute("SELECT DISTINCT seq FROM outbox ORDER BY seq")]
    assert seqs and seqs == list(range(1, len(seqs) + 1))
    return seqs


def _full_disk_run(tmp_path: Path, bundle: Path, spool: Path, min_free_mb: float) -> tuple[int, str]:
    offline = Broker(tmp_path / "nobroker")  # never started: nothing drains the spool
    folder = make_folder(tmp_path / "imgs", 4)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder), "loop": True}}]
    cfg = write_config(tmp_path / "c.yaml", bundle, offline, spool, cams)
    doc = __import__("yaml").safe_load(cfg.read_text())
    doc["spool"]["min_free_mb"] = min_free_mb
    cfg.write_text(__import__("yaml").safe_dump(doc))
    rt = Runtime(cfg, tmp_path / "rt.log")
    try:
        rc = rt.wait(120)
    finally:
        rt.kill()
    return rc, rt.log()


def test_disk_full_reports_sqlite_cause_and_keeps_stored_verdicts(
    tmp_path: Path, tiny_bundle: Path, small_fs: Path
) -> None:
    spool = small_fs / "spool.db"
    rc, log = _full_disk_run(tmp_path, tiny_bundle, spool, min_free_mb=0)  # no reserve: SQLite hits ENOSPC
    assert rc != 0, log[-3000:]
    assert "database or disk is full" in log, log[-3000:]
    assert "cannot rollback" not in log
    assert "already stored are intact" in log
    assert len(_check_intact(spool)) >= 5


def test_free_space_reserve_stops_before_the_disk_is_full(tmp_path: Path, tiny_bundle: Path) -> None:
    # 8 MiB file system: the WAL may grow to ~4 MiB before its checkpoint, 1 MiB reserve, a filler leaves ~0.4 MiB
    mnt = tmp_path / "fs8"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        (mnt / "filler").write_bytes(b"\0" * (int(2.6 * 2**20)))
        spool = mnt / "spool.db"
        rc, log = _full_disk_run(tmp_path, tiny_bundle, spool, min_free_mb=1.0)
        assert rc != 0, log[-3000:]
        assert "spool full: no room left above the free-space reserve" in log, log[-3000:]
        assert "database or disk is full" not in log
        seqs = _check_intact(spool)
        assert len(seqs) >= 100
        st = os.statvfs(mnt)
        assert st.f_bavail * st.f_frsize >= 1 * 2**20  # the reserve is still free
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
