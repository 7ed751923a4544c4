"""Camera frames: one daemon grab thread per camera and a one-slot "newest frame" buffer.

Live sources (V4L2, GStreamer, RTSP) and paced files (video with ``realtime``, any file source with ``max_fps``)
produce frames on their own clock. The grabber keeps only the newest one: a frame the consumer did not take before
the next arrived is counted in ``frames_dropped``, so inference always works on the present, never on a backlog.

Unpaced files (a folder, a video with ``realtime: false``, no ``max_fps``) have no clock: the grab thread waits until
the consumer has taken the previous frame, so every image is inspected exactly once and nothing is dropped.

Failures (the source does not open, a read fails) put the camera ``down`` and the thread reopens it with capped
exponential backoff (``reconnect_initial_s`` doubling up to ``reconnect_max_s``; each reopen attempt counts in
``reconnects``). A watchdog reports ``down`` when an open or read has been blocked for ``no_frame_timeout_s`` (a
stalled RTSP stream, an unplugged USB camera); it is evaluated whenever a consumer calls :meth:`FrameGrabber.latest`
or reads ``state``, because the grab thread itself is the one stuck. A folder or video that is not looped ends with
state ``ended``; consumers then stop using that camera.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from runtime.config import (
    CameraConfig,
    FolderSource,
    GenICamSource,
    GStreamerSource,
    RtspSource,
    V4L2Source,
    VideoFileSource,
)

logger = logging.getLogger(__name__)

State = Literal["starting", "up", "down", "ended"]
RTSP_OPEN_TIMEOUT_S = 10.0  # FFmpeg's own default is 30 s


def next_slot(due: float, now: float, period: float) -> float:
    """Next due time of a pacer that just served the slot ``due`` at ``now`` (both monotonic seconds).

    On schedule it advances by one ``period``; after falling behind by a period or more it restarts from ``now``
    instead of bursting to catch up.
    """
    return due + period if now - due < period else now + period


class SourceError(Exception):
    """A source could not be opened or read (the grab thread reconnects)."""


class SourceEnded(Exception):
    """A non-looping file source has delivered its last frame."""


class SourceIdle(Exception):
    """A triggered camera is reachable but has no frame yet (waiting for a trigger): up, not stuck."""


@dataclass(frozen=True)
class Frame:
    """One grabbed frame.

    Attributes:
        seq: per-camera sequence number, 0, 1, 2, ... in grab order (gaps mean dropped frames).
        image: uint8 ``(H, W, 3)`` BGR as OpenCV decodes (grey or 16-bit images as the source delivers them).
        timestamp: ``time.time()`` when the frame was grabbed, seconds since the epoch.
        camera: camera name from the config.
    """

    seq: int
    image: np.ndarray = field(repr=False)
    timestamp: float
    camera: str


class _Source:
    """A frame source: ``open()`` then ``read()`` until it raises; ``close()`` always."""

    paced = False  # produces frames on its own clock (live camera or realtime video)

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        """Next frame; raises :class:`SourceError` on failure or :class:`SourceEnded` at the end."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        raise NotImplementedError


class _CvSource(_Source):
    """``cv2.VideoCapture`` on a V4L2 device, GStreamer pipeline, RTSP URL or video file."""

    def __init__(
        self, src: V4L2Source | GStreamerSource | RtspSource | VideoFileSource, read_timeout_s: float = 5.0
    ) -> None:
        self.src = src
        self.read_timeout_s = read_timeout_s
        self.cap: Any = None
        self.paced = not isinstance(src, VideoFileSource) or src.realtime
        self._period = 0.0
        self._next = 0.0

    def describe(self) -> str:
        s = self.src
        if isinstance(s, V4L2Source):
            return f"v4l2:{s.device}"
        if isinstance(s, GStreamerSource):
            return f"gstreamer:{s.pipeline[:60]}"
        if isinstance(s, RtspSource):
            # keep credentials out of logs
            return "rtsp:" + s.url.split("@")[-1] if "@" in s.url else s.url
        return f"video:{s.path}"

    def open(self) -> None:
        s = self.src
        if isinstance(s, V4L2Source):
            cap = cv2.VideoCapture(s.device, cv2.CAP_V4L2)  # index or /dev/videoN path
            if s.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, s.width)
            if s.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, s.height)
            if s.fps:
                cap.set(cv2.CAP_PROP_FPS, s.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        elif isinstance(s, GStreamerSource):
            cap = cv2.VideoCapture(s.pipeline, cv2.CAP_GSTREAMER)
        elif isinstance(s, RtspSource):
            # Bound FFmpeg's blocking calls so a dead camera ends in a reconnect rather than a hung thread.
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(RTSP_OPEN_TIMEOUT_S * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(max(self.read_timeout_s, 1.0) * 1000),
            ]
            cap = cv2.VideoCapture(s.url, cv2.CAP_FFMPEG, params)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        else:
            if not s.path.is_file():
                raise SourceError(f"video file not found: {s.path}")
            cap = cv2.VideoCapture(str(s.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        self.cap = cap
        if isinstance(s, VideoFileSource):
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            self._period = 1.0 / fps if s.realtime and 0.0 < fps < 1000.0 else 0.0
            self._next = time.monotonic()

    def read(self) -> np.ndarray:
        ok, img = self.cap.read()
        if ok and img is not None:
            return img
        if isinstance(self.src, VideoFileSource):
            if not self.src.loop:
                raise SourceEnded(f"end of {self.src.path}")
            # Loop: rewind (reopen if the container cannot seek).
            if not self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                self.close()
                self.open()
            ok, img = self.cap.read()
            if ok and img is not None:
                return img
        raise SourceError(f"read failed on {self.describe()}")

    def wait_time(self) -> float:
        """Seconds to wait before the next frame to keep the file's frame rate (0 when not pacing)."""
        if self._period <= 0.0:
            return 0.0
        now = time.monotonic()
        due = self._next
        self._next = next_slot(due, max(now, due), self._period)
        return max(0.0, due - now)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class _FolderSource(_Source):
    """Images of a folder in sorted order (``pattern`` glob); unreadable files are skipped and counted."""

    def __init__(self, src: FolderSource, on_unreadable: Callable[[Path], None]) -> None:
        self.src = src
        self._files: list[Path] = []
        self._index = 0
        self._readable_this_pass = 0
        self._on_unreadable = on_unreadable

    def describe(self) -> str:
        return f"folder:{self.src.path}/{self.src.pattern}"

    def _list(self) -> list[Path]:
        if not self.src.path.is_dir():
            raise SourceError(f"image folder not found: {self.src.path}")
        files = sorted(p for p in self.src.path.glob(self.src.pattern) if p.is_file())
        if not files:
            raise SourceError(f"no files matching {self.src.pattern!r} in {self.src.path}")
        return files

    def open(self) -> None:
        self._files = self._list()
        self._index = 0
        self._readable_this_pass = 0

    def read(self) -> np.ndarray:
        while True:
            if self._index >= len(self._files):
                if not self.src.loop:
                    raise SourceEnded(f"last image of {self.src.path}")
                if self._readable_this_pass == 0:
                    raise SourceError(f"no readable image in {self.src.path}")
                self.open()  # re-list: files added meanwhile are picked up
            path = self._files[self._index]
            self._index += 1
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None or img.size == 0:
                logger.warning("skipping unreadable image %s", path)
                self._on_unreadable(path)
                continue
            if img.ndim == 3 and img.shape[2] == 4:
                img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
            self._readable_this_pass += 1
            return img


class FrameGrabber:
    """Grab frames from one camera on a daemon thread; consumers take the newest with :meth:`latest`.

    Args:
        cam: the camera config (source, ``max_fps``, watchdog and reconnect timings).
        on_state: called as ``on_state(camera_name, state)`` on every change to ``"up"``, ``"down"`` or
            ``"ended"``; from the grab thread, or from the thread calling :meth:`latest` when the watchdog fires
            there. Exceptions it raises are logged and ignored.

    Attributes:
        frames_grabbed: frames published to the slot.
        frames_dropped: published frames replaced before a consumer took them.
        frames_unreadable: folder images that could not be decoded (skipped).
        reconnects: reopen attempts after a failure.
    """

    def __init__(self, cam: CameraConfig, on_state: Callable[[str, str], None] | None = None) -> None:
        self.cam = cam
        self.name = cam.name
        self._on_state = on_state
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._slot: Frame | None = None
        self._slot_taken = True
        self._seq = -1
        self._state: State = "starting"
        self._busy_since: float | None = None  # monotonic time a blocking open/read started
        self.frames_grabbed = 0
        self.frames_dropped = 0
        self.frames_unreadable = 0
        self.reconnects = 0
        self._source = self._make_source()
        # Lossless hand-over for unpaced files; newest-only for anything with its own clock.
        self._lossless = not self._source.paced and cam.max_fps is None
        self._thread = threading.Thread(target=self._run, name=f"grab-{cam.name}", daemon=True)

    def _make_source(self) -> _Source:
        src = self.cam.source
        if isinstance(src, FolderSource):
            return _FolderSource(src, self._count_unreadable)
        if isinstance(src, GenICamSource):
            from runtime.sources.genicam import AravisSource  # rdedge[genicam]: Aravis through PyGObject

            return AravisSource(src, self.name)
        return _CvSource(src, read_timeout_s=self.cam.no_frame_timeout_s)

    def _count_unreadable(self, path: Path) -> None:
        self.frames_unreadable += 1

    # ----------------------------------------------------------------------------------------------- public API
    def start(self) -> FrameGrabber:
        """Start the grab thread (once); returns ``self``."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to stop and join it for up to ``timeout`` seconds (a read blocked inside OpenCV may
        outlive it; the thread is a daemon and releases the source when the read returns)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("camera %s: grab thread still blocked in a read after %.1f s", self.name, timeout)

    def fire(self) -> None:
        """A trigger arrived: fire the camera's software trigger when its source has one (GenICam), else nothing."""
        fire = getattr(self._source, "fire", None)
        if fire is not None:
            try:
                fire()
            except Exception as exc:  # the trigger then times out like a missing frame
                logger.warning("camera %s: software trigger failed: %s", self.name, exc)

    def __enter__(self) -> FrameGrabber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state(self) -> State:
        """``"starting"``, ``"up"``, ``"down"`` or ``"ended"``."""
        self._check_watchdog()
        return self._state

    @property
    def alive(self) -> bool:
        """Whether the grab thread is running."""
        return self._thread.is_alive()

    def latest(self, timeout: float, newer_than: int = -1) -> Frame | None:
        """Wait up to ``timeout`` seconds for a frame with ``seq > newer_than`` and take it.

        Returns:
            The newest frame, or ``None`` on timeout, after :meth:`stop`, or when the source has ended and no newer
            frame is left.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self._slot
                if frame is not None and frame.seq > newer_than:
                    self._slot_taken = True
                    self._cond.notify_all()
                    return frame
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set() or self._state == "ended":
                    break
                self._cond.wait(min(left, 0.25))
        self._check_watchdog()
        return None

    def stats(self) -> dict[str, int | str]:
        """Counters and state, JSON-serialisable."""
        return {
            "state": self.state,
            "frames_grabbed": self.frames_grabbed,
            "frames_dropped": self.frames_dropped,
            "frames_unreadable": self.frames_unreadable,
            "reconnects": self.reconnects,
        }

    # ------------------------------------------------------------------------------------------------ internals
    def _set_state(self, state: State, reason: str = "") -> None:
        with self._cond:
            if state == self._state:
                return
            self._state = state
            self._cond.notify_all()
        log = logger.warning if state == "down" else logger.info
        log("camera %s %s%s", self.name, state, f": {reason}" if reason else "")
        if self._on_state is not None:
            try:
                self._on_state(self.name, state)
            except Exception:
                logger.exception("camera %s: on_state callback failed", self.name)

    def _check_watchdog(self) -> None:
        """Report ``down`` when an open or read has been blocked for longer than ``no_frame_timeout_s``."""
        busy = self._busy_since
        if self._state in ("starting", "up") and busy is not None:
            stuck = time.monotonic() - busy
            if stuck > self.cam.no_frame_timeout_s:
                self._set_state("down", f"no frame for {stuck:.1f} s")

    def _publish(self, img: np.ndarray, grabbed_at: float) -> None:
        with self._cond:
            if self._lossless:
                while not self._slot_taken and not self._stop.is_set():
                    self._cond.wait(0.25)
                if self._stop.is_set():
                    return
            self._seq += 1
            if not self._slot_taken:
                self.frames_dropped += 1
            self._slot = Frame(seq=self._seq, image=img, timestamp=grabbed_at, camera=self.name)
            self._slot_taken = False
            self.frames_grabbed += 1
            self._cond.notify_all()

    def _wait(self, seconds: float) -> bool:
        """Interruptible sleep; returns False when stopping."""
        return not self._stop.wait(seconds) if seconds > 0 else not self._stop.is_set()

    def _run(self) -> None:
        src = self._source
        backoff = self.cam.reconnect_initial_s
        min_period = 1.0 / self.cam.max_fps if self.cam.max_fps else 0.0
        next_publish = time.monotonic()
        is_open = False
        try:
            while not self._stop.is_set():
                try:
                    if not is_open:
                        self._busy_since = time.monotonic()
                        src.open()
                        is_open = True
                        logger.info("camera %s: opened %s", self.name, src.describe())
                    if isinstance(src, _CvSource) and not self._wait(src.wait_time()):
                        break
                    self._busy_since = time.monotonic()
                    img = src.read()
                    grabbed_at = time.time()
                    self._busy_since = None
                except SourceEnded as exc:
                    self._busy_since = None
                    self._set_state("ended", str(exc))
                    break
                except SourceIdle:
                    self._busy_since = None
                    backoff = self.cam.reconnect_initial_s
                    self._set_state("up")
                    continue
                except Exception as exc:  # SourceError, or anything OpenCV throws
                    self._busy_since = None
                    src.close()
                    is_open = False
                    self._set_state("down", str(exc))
                    if not self._wait(backoff):
                        break
                    backoff = min(backoff * 2.0, self.cam.reconnect_max_s)
                    self.reconnects += 1
                    continue
                backoff = self.cam.reconnect_initial_s
                if min_period:
                    now = time.monotonic()
                    if src.paced:
                        # Live source: keep reading (drains the device buffer), publish at most max_fps.
                        if now < next_publish:
                            continue
                    elif not self._wait(next_publish - now):
                        break
                    else:
                        grabbed_at = time.time()  # a replayed file is "captured" when its slot comes, not when read
                    next_publish = next_slot(next_publish, time.monotonic(), min_period)
                self._set_state("up")
                self._publish(img, grabbed_at)
        finally:
            src.close()
            with self._cond:
                self._cond.notify_all()
            logger.debug("camera %s: grab thread exits", self.name)
