"""FrameGrabber on real sources: image folders, an MJPG video written with cv2.VideoWriter, a missing device."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.capture import Frame, FrameGrabber, next_slot
from runtime.config import CameraConfig


def _cam(source: dict[str, Any], **kw: Any) -> CameraConfig:
    return CameraConfig.model_validate({"name": "cam1", "source": source, **kw})


def _write_images(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), np.full((24, 32, 3), i * 10, np.uint8))


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class _States:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, camera: str, state: str) -> None:
        with self.lock:
            self.seen.append((camera, state))

    @property
    def states(self) -> list[str]:
        with self.lock:
            return [s for _, s in self.seen]


def _drain(g: FrameGrabber, timeout: float = 2.0) -> list[Frame]:
    frames: list[Frame] = []
    last = -1
    while (f := g.latest(timeout, newer_than=last)) is not None:
        frames.append(f)
        last = f.seq
    return frames


def test_folder_once_delivers_every_image_in_order_then_ends(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    states = _States()
    t0 = time.time()
    with FrameGrabber(_cam({"kind": "folder", "path": str(tmp_path / "imgs"), "pattern": "*.png"}), states) as g:
        frames = _drain(g)
        assert _wait_for(lambda: g.state == "ended")
        assert g.latest(0.5, newer_than=frames[-1].seq) is None  # returns at once after the end
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 10, 20, 30, 40]
    assert all(f.camera == "cam1" and t0 <= f.timestamp <= time.time() for f in frames)
    assert (g.frames_grabbed, g.frames_dropped, g.reconnects) == (5, 0, 0)
    assert states.states == ["up", "ended"]


def test_folder_loop_starts_again(tmp_path: Path) -> None:
    _write_images(tmp_path, 3)
    with FrameGrabber(_cam({"kind": "folder", "path": str(tmp_path), "loop": True})) as g:
        got = [g.latest(2.0, newer_than=s - 1) for s in range(8)]
    assert [f.seq for f in got if f] == list(range(8))
    assert [int(f.image[0, 0, 0]) for f in got if f] == [0, 10, 20, 0, 10, 20, 0, 10]


def test_unreadable_image_is_skipped_and_counted(tmp_path: Path) -> None:
    _write_images(tmp_path, 2)
    (tmp_path / "img_000b.png").write_bytes(b"\x89PNG garbage")
    with FrameGrabber(_cam({"kind": "folder", "path": str(tmp_path)})) as g:
        frames = _drain(g)
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 10]
    assert g.frames_unreadable == 1


def test_slow_consumer_gets_the_newest_frame_and_drops_are_counted(tmp_path: Path) -> None:
    _write_images(tmp_path, 4)
    cam = _cam({"kind": "folder", "path": str(tmp_path), "loop": True}, max_fps=200)
    taken = 0
    with FrameGrabber(cam) as g:
        last = -1
        for _ in range(5):
            time.sleep(0.06)  # slower than the 200 fps source
            newest = g.frames_grabbed - 1
            f = g.latest(1.0, newer_than=last)
            assert f is not None and f.seq >= newest > last  # never a stale frame
            last = f.seq
            taken += 1
        g.stop()
        pending = 1 if g.latest(0.0, newer_than=last) is not None else 0
    assert g.frames_dropped > 10
    assert g.frames_grabbed == taken + g.frames_dropped + pending
    assert g.frames_grabbed < 0.06 * 5 * 200 * 1.5 + 5  # max_fps paced the folder


def _write_video(path: Path, n: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()


def test_video_file_as_fast_as_possible_is_lossless(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 10, 25.0)
    states = _States()
    with FrameGrabber(_cam({"kind": "video", "path": str(video), "realtime": False}), states) as g:
        frames = _drain(g)
    levels = [int(f.image[24, 32].mean()) for f in frames]
    assert len(frames) == 10 and g.frames_dropped == 0
    assert all(abs(lv - 20 * i) <= 4 for i, lv in enumerate(levels)), levels  # MJPG is lossy
    assert states.states == ["up", "ended"]


def test_video_realtime_is_paced_by_file_fps(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 10, 50.0)
    with FrameGrabber(_cam({"kind": "video", "path": str(video), "realtime": True})) as g:
        t0 = time.monotonic()
        assert _wait_for(lambda: g.state == "ended", 5.0)
        took = time.monotonic() - t0
    assert g.frames_grabbed == 10
    assert 0.15 <= took < 2.0  # 10 frames at 50 fps: about 0.2 s


def test_video_loop_keeps_going(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 3, 25.0)
    with FrameGrabber(_cam({"kind": "video", "path": str(video), "realtime": False, "loop": True})) as g:
        got = [g.latest(2.0, newer_than=s - 1) for s in range(7)]
    assert all(f is not None for f in got)
    assert g.reconnects == 0


def test_missing_folder_goes_down_with_backoff_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    states = _States()
    cam = _cam({"kind": "folder", "path": str(folder)}, reconnect_initial_s=0.02, reconnect_max_s=0.08)
    with FrameGrabber(cam, states) as g:
        assert _wait_for(lambda: g.reconnects >= 3)
        assert g.state == "down" and g.latest(0.05) is None
        _write_images(folder, 2)
        f = g.latest(3.0)
        assert f is not None and f.seq == 0
        assert g.state == "up"
    assert states.states[:2] == ["down", "up"]


def test_missing_video_file_recovers_when_it_appears(tmp_path: Path) -> None:
    video = tmp_path / "later.avi"
    cam = _cam({"kind": "video", "path": str(video), "realtime": False}, reconnect_initial_s=0.02, reconnect_max_s=0.05)
    with FrameGrabber(cam) as g:
        assert _wait_for(lambda: g.reconnects >= 2 and g.state == "down")
        _write_video(tmp_path / "tmp.avi", 3, 25.0)
        (tmp_path / "tmp.avi").rename(video)
        assert len(_drain(g)) == 3


def test_missing_v4l2_device_reconnects(tmp_path: Path) -> None:
    cam = _cam({"kind": "v4l2", "device": "/dev/video-rdedge-test-missing"}, reconnect_initial_s=0.02)
    with FrameGrabber(cam) as g:
        assert _wait_for(lambda: g.reconnects >= 2)
        assert g.state == "down"
        assert g.stats()["state"] == "down"


def test_stop_joins_quickly_while_the_consumer_is_away(tmp_path: Path) -> None:
    _write_images(tmp_path, 3)
    g = FrameGrabber(_cam({"kind": "folder", "path": str(tmp_path), "loop": True})).start()
    assert g.latest(2.0) is not None
    t0 = time.monotonic()
    g.stop()
    assert time.monotonic() - t0 < 1.0 and not g.alive


def test_next_slot_paces_without_bursts() -> None:
    assert next_slot(10.0, 10.01, 0.1) == pytest.approx(10.1)  # on time: one period on
    assert next_slot(10.0, 10.5, 0.1) == pytest.approx(10.6)  # late: restart from now, no catch-up burst


def test_watchdog_reports_a_stalled_rtsp_camera_down() -> None:
    # A TCP server that accepts the RTSP connection and never answers: FFmpeg blocks inside open().
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    states = _States()
    cam = _cam({"kind": "rtsp", "url": f"rtsp://127.0.0.1:{port}/stream"}, no_frame_timeout_s=0.3)
    t0 = time.monotonic()  # before start(): the watchdog's clock starts there
    g = FrameGrabber(cam, states).start()
    try:
        assert _wait_for(lambda: g.state == "down", 5.0)
        assert 0.3 <= time.monotonic() - t0 < 3.0
        assert g.reconnects == 0  # the watchdog said so, not a failed open
        assert states.states == ["down"]
    finally:
        server.close()  # FFmpeg sees the connection drop and open() returns
        g.stop(timeout=5.0)
    assert not g.alive
