"""Service health: systemd notify (stdlib socket), a progress-gated watchdog, latency statistics.

systemd protocol (``sd_notify(3)``): one datagram ``KEY=VALUE\\n...`` to the unix socket in ``$NOTIFY_SOCKET``; a
leading ``@`` means the Linux abstract namespace. Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a cheap no-op. The unit uses ``Type=notify`` and ``WatchdogSec=``; systemd exports
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) and we ping at half that period -- but only while the scoring loop keeps
making progress, so a hung inference (driver stall, deadlock) gets the service restarted instead of kept alive by a
healthy-looking side thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


def _notify_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        return "\0" + addr[1:]  # abstract namespace
    if addr[0] != "/":
        return None  # vsock and friends: not supported here
    return addr


def sd_notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=scoring"``) to systemd.

    Returns:
        True when a datagram was sent, False when there is no notify socket or sending failed (never raises).
    """
    addr = _notify_address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall("\n".join(fields).encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify(%s) failed: %s", fields, exc)
        return False


def watchdog_period_s() -> float | None:
    """systemd's watchdog timeout in seconds (``$WATCHDOG_USEC``), or ``None`` when disabled / meant for another PID."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every half period while :meth:`progress` was called within the last period.

    Args:
        period_s: the watchdog timeout (default: from ``$WATCHDOG_USEC``); ``None`` disables pinging.
        stale_after_s: how old the last progress may be for a ping (default: ``period_s``).
    """

    def __init__(self, period_s: float | None = None, stale_after_s: float | None = None) -> None:
        self.period_s = period_s if period_s is not None else watchdog_period_s()
        self.stale_after_s = stale_after_s if stale_after_s is not None else (self.period_s or 0.0)
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    def progress(self) -> None:
        """Mark that the scoring loop is alive (cheap: one monotonic read)."""
        self._last_progress = time.monotonic()

    def start(self) -> None:
        """Start the ping thread (does nothing when the watchdog is disabled)."""
        if not self.period_s or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        log.info("systemd watchdog: %.1f s, pinging every %.1f s while the scoring loop progresses", self.period_s,
                 self.period_s / 2)  # fmt: skip

    def _run(self) -> None:
        assert self.period_s
        while not self._stop.wait(self.period_s / 2):
            if time.monotonic() - self._last_progress <= self.stale_after_s:
                sd_notify("WATCHDOG=1")
                self.pings += 1
            else:
                self.skipped += 1
                log.error("scoring loop made no progress for %.1f s: not pinging the watchdog",
                          time.monotonic() - self._last_progress)  # fmt: skip

    def stop(self) -> None:
        """Stop the ping thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def percentile_sorted(a: np.ndarray, q: float) -> float:
    """numpy's default (linear) percentile ``q`` of an ascending, non-empty array.

    Not ``np.percentile``: its first call imports ``numpy.ma`` (measured 21 ms holding the GIL, in the stats thread
    while the scoring loop runs; the first stats document took 13-26 ms, later ones 1.3 ms).
    """
    pos = (a.size - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, a.size - 1)
    return float(a[lo] + (a[hi] - a[lo]) * (pos - lo))


class LatencyTracker:
    """Ring buffers of per-stage latencies (ms) and frame times, for p50/p99 and frames/s in stats.

    Args:
        window: how many recent frames the percentiles cover.
    """

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self._stages: dict[str, deque[float]] = {}
        self._times: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.count = 0

    def record(self, timings_ms: Mapping[str, float], at: float | None = None) -> None:
        """Add one frame's stage timings (ms) observed at monotonic time ``at`` (default now)."""
        with self._lock:
            for stage, ms in timings_ms.items():
                buf = self._stages.get(stage)
                if buf is None:
                    buf = self._stages[stage] = deque(maxlen=self.window)
                buf.append(float(ms))
            self._times.append(time.monotonic() if at is None else at)
            self.count += 1

    def percentiles(self) -> dict[str, dict[str, float]]:
        """``{stage: {"p50": ms, "p99": ms, "n": samples}}`` over the window."""
        with self._lock:
            snap = {k: np.sort(np.fromiter(v, dtype=np.float64)) for k, v in self._stages.items() if v}
        return {
            k: {"p50": round(percentile_sorted(a, 50), 3), "p99": round(percentile_sorted(a, 99), 3), "n": int(a.size)}
            for k, a in snap.items()
        }

    def fps(self, horizon_s: float = 10.0, now: float | None = None) -> float:
        """Frames per second over the last ``horizon_s`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            n = sum(1 for t in self._times if now - t <= horizon_s)
        return round(n / horizon_s, 3) if horizon_s > 0 else 0.0
