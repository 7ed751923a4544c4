"""Live state per camera: counters (since start, per shift), fps, score history and the latest overlay JPEG.

:meth:`LiveState.on_verdict` runs on the scoring thread and only counts and swaps references: every verdict
overwrites its camera's *latest-value slot* (one per camera, never queued). The encoder thread takes a slot at most
``live_fps`` times a second per camera and turns that newest frame into a heatmap-overlay JPEG for the page, so the
page always ends on the last frame scored (a triggered camera's last part too) and the scoring loop never waits.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.outputs import VerdictEvent

log = logging.getLogger(__name__)

FPS_HORIZON_S = 5.0


@dataclass
class Counters:
    """OK / NG / unscorable frames."""

    ok: int = 0
    ng: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"ok": self.ok, "ng": self.ng, "errors": self.errors}


@dataclass
class CameraLive:
    """What the page shows for one camera."""

    name: str
    total: Counters = field(default_factory=Counters)
    shift: Counters = field(default_factory=Counters)
    total_since: float = field(default_factory=time.time)
    last: dict[str, Any] | None = None
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=512))
    history: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)  # (ts, score)
    encoded_at: float = 0.0  # monotonic
    jpeg: bytes | None = None
    jpeg_meta: dict[str, Any] | None = None
    frames_encoded: int = 0


def shift_start(now: float, shifts: list[str]) -> float:
    """Start (epoch s) of the shift running at ``now``; ``shifts`` are sorted local ``HH:MM`` start times."""
    local = dt.datetime.fromtimestamp(now)
    best: dt.datetime | None = None
    for day in (local.date() - dt.timedelta(days=1), local.date()):
        for s in shifts:
            hh, mm = (int(x) for x in s.split(":"))
            t = dt.datetime.combine(day, dt.time(hh, mm))
            if t <= local and (best is None or t > best):
                best = t
    assert best is not None  # yesterday's last shift always started before now
    return best.timestamp()


def next_shift_start(now: float, shifts: list[str]) -> float:
    """The next shift boundary after ``now`` (epoch s)."""
    local = dt.datetime.fromtimestamp(now)
    for day in (local.date(), local.date() + dt.timedelta(days=1)):
        for s in shifts:
            hh, mm = (int(x) for x in s.split(":"))
            t = dt.datetime.combine(day, dt.time(hh, mm))
            if t > local:
                return t.timestamp()
    raise AssertionError("unreachable: tomorrow has a shift")


class LiveState:
    """Counters, history and the live JPEG of every camera.

    Args:
        cameras: camera names.
        live_fps: encode at most this many frames per second per camera.
        jpeg_quality: JPEG quality of the live view.
        history: recent scores kept per camera.
        shifts: sorted local ``HH:MM`` shift start times.
    """

    def __init__(self, cameras: list[str], live_fps: float, jpeg_quality: int, history: int, shifts: list[str]):
        self.cams = {c: CameraLive(c, history=collections.deque(maxlen=history)) for c in cameras}
        self.min_gap_s = 1.0 / live_fps
        self.jpeg_quality = jpeg_quality
        self.shifts = shifts
        now = time.time()
        self.shift_started = shift_start(now, shifts)
        self._shift_ends = next_shift_start(now, shifts)
        self._lock = threading.Lock()
        self._slot: dict[str, VerdictEvent] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- scoring thread ----------------------------------------------------------------------------------------------

    def _roll_shift(self, now: float) -> None:
        if now < self._shift_ends:
            return
        self.shift_started = shift_start(now, self.shifts)
        self._shift_ends = next_shift_start(now, self.shifts)
        for c in self.cams.values():
            c.shift = Counters()
        log.info("station: new shift since %s: shift counters start at 0", time.ctime(self.shift_started))

    def on_verdict(self, ev: VerdictEvent) -> None:
        """Count the verdict and offer the frame to the encoder if the camera's slot is due (scoring thread)."""
        c = self.cams[ev.camera]
        with self._lock:
            self._roll_shift(ev.ts)
            for k in (c.total, c.shift):
                if ev.is_ng:
                    k.ng += 1
                else:
                    k.ok += 1
            c.times.append(ev.ts)
            c.history.append((ev.ts, ev.score))
            c.last = {"seq": ev.seq, "frame_seq": ev.frame_seq, "ts": ev.ts, "score": ev.score,
                      "threshold": ev.threshold, "verdict": "NG" if ev.is_ng else "OK", "model_id": ev.model_id,
                      "latency_ms": round(ev.timings_ms.get("total", 0.0), 3)}  # fmt: skip
            self._slot[ev.camera] = ev  # latest value: an older, not yet encoded frame is simply replaced
        self._wake.set()

    def on_frame_error(self, camera: str) -> None:
        c = self.cams[camera]
        with self._lock:
            self._roll_shift(time.time())
            c.total.errors += 1
            c.shift.errors += 1

    # -- page side ---------------------------------------------------------------------------------------------------

    def fps(self, camera: str, now: float | None = None) -> float:
        now = time.time() if now is None else now
        with self._lock:
            n = sum(1 for t in self.cams[camera].times if now - t <= FPS_HORIZON_S)
        return round(n / FPS_HORIZON_S, 2)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per camera: counters, last verdict, fps, frames offered/encoded (JSON-ready)."""
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for name in self.cams:
            fps = self.fps(name, now)
            with self._lock:
                c = self.cams[name]
                out[name] = {"total": c.total.as_dict(), "total_since": c.total_since, "shift": c.shift.as_dict(),
                             "shift_since": self.shift_started, "last": dict(c.last) if c.last else None, "fps": fps,
                             "frames_encoded": c.frames_encoded,
                             "image_seq": c.jpeg_meta["seq"] if c.jpeg_meta else None}  # fmt: skip
        return out

    def jpeg(self, camera: str) -> bytes | None:
        with self._lock:
            return self.cams[camera].jpeg

    def scores(self, camera: str | None = None) -> list[float]:
        """Recent scores (oldest first) of one camera or all."""
        with self._lock:
            names = [camera] if camera else list(self.cams)
            return [s for n in names for _, s in self.cams[n].history]

    def clear_history(self) -> None:
        """Forget the score history (after a model swap)."""
        with self._lock:
            for c in self.cams.values():
                c.history.clear()

    def reset(self, camera: str | None, scope: str) -> dict[str, dict[str, int]]:
        """Zero the ``"shift"`` or ``"total"`` counters of one camera (or all); returns the old values."""
        with self._lock:
            old = {}
            for name in [camera] if camera else list(self.cams):
                c = self.cams[name]
                old[name] = getattr(c, scope).as_dict()
                setattr(c, scope, Counters())
                if scope == "total":
                    c.total_since = time.time()
            return old

    # -- encoder thread ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._encode_loop, name="station-live", daemon=True)
        self._thread.start()

    def _encode_loop(self) -> None:
        from runtime.overlay import encode_jpeg, overlay_heatmap

        timeout = 0.5
        while not self._stop.is_set():
            self._wake.wait(timeout)
            self._wake.clear()
            now = time.monotonic()
            todo: list[VerdictEvent] = []
            next_due = float("inf")
            with self._lock:
                for cam in list(self._slot):
                    c = self.cams[cam]
                    due = c.encoded_at + self.min_gap_s
                    if now >= due:
                        todo.append(self._slot.pop(cam))
                        c.encoded_at = now
                    else:
                        next_due = min(next_due, due)
            timeout = min(0.5, max(0.0, next_due - time.monotonic()))
            for ev in todo:
                try:
                    jpeg = encode_jpeg(overlay_heatmap(ev.image, ev.anomaly_map, ev.threshold), self.jpeg_quality)
                except Exception:
                    log.exception("station: live overlay of camera %s failed", ev.camera)
                    continue
                with self._lock:
                    c = self.cams[ev.camera]
                    c.jpeg = jpeg
                    c.jpeg_meta = {"seq": ev.seq, "score": ev.score, "verdict": "NG" if ev.is_ng else "OK"}
                    c.frames_encoded += 1

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
