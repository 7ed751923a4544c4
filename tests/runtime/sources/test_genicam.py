"""GenICam through Aravis: Aravis' own fake GigE Vision camera (arv-fake-gv-camera-0.8) serves frames on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.config import parse_config
from runtime.errors import ConfigError
from runtime.outputs import Output, VerdictEvent
from runtime.service import Service

FAKE = shutil.which("arv-fake-gv-camera-0.8")
try:
    from runtime.sources.genicam import load_aravis, to_bgr

    load_aravis()
    HAVE_ARAVIS = True
except Exception:  # MissingExtraError, or runtime.sources import problems on a box without gi
    HAVE_ARAVIS = False

if os.environ.get("CI") and (FAKE is None or not HAVE_ARAVIS):  # CI installs them: a skip there tests nothing
    pytest.fail("CI: Aravis (arv-fake-gv-camera-0.8, gir1.2-aravis-0.8, gi in the venv) is missing", pytrace=False)

pytestmark = pytest.mark.skipif(
    FAKE is None or not HAVE_ARAVIS,
    reason="needs Debian aravis-tools (arv-fake-gv-camera-0.8), gir1.2-aravis-0.8, python3-gi linked into the venv",
)


class Recorder(Output):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[VerdictEvent] = []

    def on_verdict(self, event: VerdictEvent) -> None:
        self.events.append(event)


class FakeCamera:
    """``arv-fake-gv-camera-0.8 -i 127.0.0.1 -s SERIAL`` as a subprocess (GVCP on 127.0.0.1:3956)."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert FAKE is not None
        self.proc = subprocess.Popen([FAKE, "-i", "127.0.0.1", "-s", self.serial], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def fake_camera() -> Iterator[FakeCamera]:
    cam = FakeCamera(f"RD{int(time.time() * 1000) % 100000:05d}")
    cam.start()
    yield cam
    cam.kill()


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _service(bundle: Path, cam: FakeCamera, mode: str, trigger: str, **src: Any) -> tuple[Service, Recorder]:
    source = {"kind": "genicam", "camera_id": f"Aravis-Fake-{cam.serial}", "trigger": trigger, "pixel_format": "Mono8",
              "exposure_us": 2000, "gain": 1.0, **src}  # fmt: skip
    cfg = parse_config({
        "bundle": str(bundle), "mqtt": None,
        "cameras": [{"name": "gige", "mode": mode, "source": source, "no_frame_timeout_s": 3,
                     "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0}],
    })  # fmt: skip
    svc = Service(cfg, threading.Event())
    rec = Recorder()
    svc.outputs.append(rec)
    svc.open()
    threading.Thread(target=svc.loop, daemon=True).start()
    return svc, rec


def _close(svc: Service) -> None:
    svc.stop.set()
    time.sleep(0.2)
    svc.close(ended=False)


def test_free_run_scores_frames_and_survives_the_camera_disappearing(
    tiny_bundle: Path, fake_camera: FakeCamera
) -> None:
    svc, rec = _service(tiny_bundle, fake_camera, "continuous", "free_run", frame_rate=20)
    states: list[str] = []
    try:
        _wait(lambda: len(rec.events) >= 10, 20, "free-run verdicts")
        ev = rec.events[-1]
        assert ev.image.shape == (512, 512, 3) and ev.image.dtype == np.uint8  # Mono8 -> BGR
        assert svc.cams["gige"].grabber.state == "up"
        fake_camera.kill()
        _wait(lambda: svc.cams["gige"].grabber.state == "down", 10, "camera down after the kill")
        states.append("down")
        n = len(rec.events)
        time.sleep(1.0)
        assert len(rec.events) <= n + 1  # nothing scored while it is gone
        fake_camera.start()
        _wait(lambda: svc.cams["gige"].grabber.state == "up", 20, "camera up again")
        states.append("up")
        _wait(lambda: len(rec.events) >= n + 10, 20, "verdicts resume")
        assert svc.cams["gige"].grabber.reconnects >= 1
    finally:
        _close(svc)
    assert states == ["down", "up"]
    seqs = [e.seq for e in rec.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_software_trigger_scores_one_fresh_frame_per_trigger(tiny_bundle: Path, fake_camera: FakeCamera) -> None:
    svc, rec = _service(tiny_bundle, fake_camera, "triggered", "software")
    try:
        grabber = svc.cams["gige"].grabber
        _wait(lambda: grabber.state == "up", 10, "camera up while waiting for triggers")
        time.sleep(1.0)
        assert grabber.frames_grabbed == 0, "the camera does not stream in software-trigger mode"
        assert grabber.state == "up", "waiting for a trigger is not 'no frame'"
        for i in range(10):
            svc.trigger("gige", f"t{i}")
            _wait(lambda i=i: len(rec.events) == i + 1, 5, f"verdict for trigger {i}")
        assert [e.trigger_id for e in rec.events] == [f"t{i}" for i in range(10)]
        assert grabber.frames_grabbed <= 12  # one exposure per trigger (a spare at most)
    finally:
        _close(svc)


def test_config_and_pixel_conversion() -> None:
    with pytest.raises(ConfigError, match="software needs mode: triggered"):
        parse_config({"bundle": "b", "cameras": [{"name": "c", "source": {"kind": "genicam", "trigger": "software"}}]})
    with pytest.raises(ConfigError, match=r"cameras\.0\.source\.genicam\.pixel_format"):
        parse_config({"bundle": "b", "cameras": [{"name": "c", "source": {"kind": "genicam", "pixel_format": "YUV"}}]})
    mono16 = (np.arange(12, dtype="<u2") * 4096).tobytes()
    out = to_bgr(mono16, 4, 3, "Mono16")
    assert out.shape == (3, 4, 3) and out[0, 1, 0] == 16
    rgb = bytes([255, 0, 0] * 4)
    assert to_bgr(rgb, 2, 2, "RGB8")[0, 0].tolist() == [0, 0, 255]
    from runtime.capture import SourceError

    with pytest.raises(SourceError, match="does not hold"):
        to_bgr(b"\0" * 5, 4, 3, "Mono8")
