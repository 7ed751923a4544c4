"""systemd notify against real unix datagram sockets; watchdog gating; latency statistics."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.health import LatencyTracker, Watchdog, percentile_sorted, sd_notify, watchdog_period_s


def _recv_all(sock: socket.socket, wait_s: float = 0.2) -> list[str]:
    sock.settimeout(wait_s)
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # short path: AF_UNIX paths are limited to ~107 bytes and pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="sdn"))
    path = d / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    path.unlink(missing_ok=True)
    d.rmdir()


def test_sd_notify_path_socket(notify_socket: socket.socket) -> None:
    assert sd_notify("READY=1", "STATUS=scoring 2 cameras")
    assert _recv_all(notify_socket) == ["READY=1\nSTATUS=scoring 2 cameras"]


def test_sd_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rdedge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1")
        assert _recv_all(sock) == ["STOPPING=1"]


def test_sd_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/dir/sock")
    assert sd_notify("READY=1") is False  # never raises


def test_watchdog_period_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_period_s() == 4.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_period_s() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_period_s() == 4.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_period_s() is None


def test_watchdog_pings_only_while_progressing(notify_socket: socket.socket) -> None:
    wd = Watchdog(period_s=0.2)
    wd.start()
    try:
        for _ in range(6):  # progress for 0.6 s -> pings every 0.1 s
            wd.progress()
            time.sleep(0.1)
        pings = [m for m in _recv_all(notify_socket, 0.05) if m == "WATCHDOG=1"]
        assert len(pings) >= 2  # every 0.1 s for 0.6 s; tolerant of a loaded CI box
        time.sleep(0.5)  # loop "hangs": pings stop once progress is older than the period
        _recv_all(notify_socket, 0.05)
        time.sleep(0.3)
        assert _recv_all(notify_socket, 0.05) == []
        assert wd.skipped >= 2
    finally:
        wd.stop()


def test_latency_tracker_percentiles_and_fps() -> None:
    tr = LatencyTracker(window=100)
    t0 = 1000.0
    for i in range(200):
        tr.record({"preprocess": 1.0, "total": float(i % 100)}, at=t0 + i * 0.05)
    p = tr.percentiles()
    assert p["preprocess"] == {"p50": 1.0, "p99": 1.0, "n": 100}
    assert 49.0 <= p["total"]["p50"] <= 50.0 and p["total"]["p99"] >= 98.0
    assert tr.count == 200
    # 100 frames kept in the window, at 20 frames/s; over the last 2 s: 40 (+1 at the edge) frames
    assert tr.fps(horizon_s=2.0, now=t0 + 199 * 0.05) == pytest.approx(20.5, abs=0.6)


def test_percentile_sorted_matches_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100, 1000):
        a = np.sort(rng.exponential(5.0, n))
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile_sorted(a, q) == pytest.approx(float(np.percentile(a, q)), rel=1e-12, abs=1e-12)
