"""GigE Vision / USB3 Vision cameras through Aravis (``rdedge[genicam]``: Debian ``gir1.2-aravis-0.8`` +
``python3-gi``; docs/genicam.md).

Aravis is reached through PyGObject (``gi``), which Debian and JetPack install for the system Python; a venv sees it
through the ``gi`` link that docs/genicam.md describes. Nothing here needs a second OpenCV: Bayer and colour
conversion use the OpenCV rdedge already runs on.

Frames: one Aravis stream with ``buffers`` queued buffers; :meth:`AravisSource.read` pops one, converts it to uint8
``(H, W, 3)`` BGR and gives the buffer back. In software or hardware trigger mode a read that waits for a trigger
raises :class:`~runtime.capture.SourceIdle` every ``IDLE_POLL_S`` after checking the camera still answers, so the
grabber shows the camera ``up`` while it waits and ``down`` when it is gone (cable pulled, camera off); the grabber
then reopens it with its usual backoff.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import cv2
import numpy as np

from runtime.capture import SourceError, SourceIdle, _Source
from runtime.config import GenICamSource
from runtime.errors import MissingExtraError

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
FREE_RUN_TIMEOUT_S = 2.0

# GenICam PFNC pixel formats -> OpenCV conversion to BGR. GenICam names a Bayer pattern by its first row, OpenCV
# by its second: GenICam BayerRG is OpenCV's BayerBG.
_BAYER = {"BayerRG8": cv2.COLOR_BayerBG2BGR, "BayerGR8": cv2.COLOR_BayerGB2BGR, "BayerGB8": cv2.COLOR_BayerGR2BGR,
          "BayerBG8": cv2.COLOR_BayerRG2BGR}  # fmt: skip


def load_aravis() -> tuple[Any, Any]:
    """``(Aravis, GLib)`` from PyGObject; raises :class:`MissingExtraError` naming what to install."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:
        raise MissingExtraError(
            "Aravis 0.8 for Python", "genicam",
            f"GenICam cameras; also apt-get install gir1.2-aravis-0.8 python3-gi and link gi into the venv: {exc}",
        ) from None  # fmt: skip
    return Aravis, GLib


def to_bgr(data: bytes, width: int, height: int, fmt: str) -> np.ndarray:
    """One buffer's pixels -> uint8 ``(height, width, 3)`` BGR.

    Raises:
        SourceError: a pixel format rdedge does not convert, or a buffer of the wrong size.
    """
    try:
        if fmt == "Mono8":
            return cv2.cvtColor(np.frombuffer(data, np.uint8).reshape(height, width), cv2.COLOR_GRAY2BGR)
        if fmt == "Mono16":  # 16-bit container (10/12/16 bits used): keep the top 8 of 16
            mono = (np.frombuffer(data, "<u2").reshape(height, width) >> 8).astype(np.uint8)
            return cv2.cvtColor(mono, cv2.COLOR_GRAY2BGR)
        if fmt in _BAYER:
            return cv2.cvtColor(np.frombuffer(data, np.uint8).reshape(height, width), _BAYER[fmt])
        if fmt == "RGB8":
            return cv2.cvtColor(np.frombuffer(data, np.uint8).reshape(height, width, 3), cv2.COLOR_RGB2BGR)
        if fmt == "BGR8":
            return np.frombuffer(data, np.uint8).reshape(height, width, 3).copy()
    except ValueError as exc:
        raise SourceError(f"{fmt} buffer of {len(data)} bytes does not hold {width}x{height}: {exc}") from None
    raise SourceError(f"pixel format {fmt} is not supported (use Mono8, Mono16, RGB8, BGR8 or Bayer*8)")


class AravisSource(_Source):
    """One GenICam camera.

    Args:
        src: the camera's ``source`` config (id, pixel format, exposure, gain, frame rate, trigger).
        name: the camera name (for logs).
    """

    paced = True  # the camera has its own clock (or the trigger's)

    def __init__(self, src: GenICamSource, name: str) -> None:
        self.Aravis, self.GLib = load_aravis()
        self.src = src
        self.name = name
        self.cam: Any = None
        self.stream: Any = None
        self.device_id = ""
        self.fmt = ""
        self._gone = False  # the last read failed: the camera may not answer any more
        self._lock = threading.Lock()  # software trigger (scoring thread) vs close (grab thread)

    def describe(self) -> str:
        return f"genicam:{self.device_id or self.src.camera_id or 'first'} ({self.src.trigger})"

    def open(self) -> None:
        A, s = self.Aravis, self.src
        try:
            A.update_device_list()
            cam = A.Camera.new(s.camera_id)
        except self.GLib.Error as exc:
            raise SourceError(f"GenICam camera {s.camera_id or '(first)'} not found: {exc.message}") from None
        try:
            if s.pixel_format is not None:
                cam.set_pixel_format_from_string(s.pixel_format)
            if s.exposure_us is not None:
                if cam.is_exposure_auto_available():
                    cam.set_exposure_time_auto(A.Auto.OFF)
                cam.set_exposure_time(s.exposure_us)
            if s.gain is not None:
                if cam.is_gain_auto_available():
                    cam.set_gain_auto(A.Auto.OFF)
                cam.set_gain(s.gain)
            if s.trigger == "free_run":
                cam.clear_triggers()
                if s.frame_rate is not None:
                    cam.set_frame_rate(s.frame_rate)
            elif s.trigger == "software":
                cam.set_trigger("Software")
            else:
                cam.set_trigger(s.trigger_line)
            if s.packet_size is not None and cam.is_gv_device():
                cam.gv_set_packet_size(s.packet_size)
            cam.set_acquisition_mode(A.AcquisitionMode.CONTINUOUS)
            stream = cam.create_stream(None, None)
            size = cam.get_payload()
            for _ in range(s.buffers):
                stream.push_buffer(A.Buffer.new_allocate(size))
            cam.start_acquisition()
            fmt = str(cam.get_pixel_format_as_string())
        except self.GLib.Error as exc:
            raise SourceError(f"GenICam camera {s.camera_id or '(first)'}: cannot configure: {exc.message}") from None
        with self._lock:
            self.cam, self.stream, self.fmt, self._gone = cam, stream, fmt, False
        self.device_id = str(cam.get_device_id())
        log.info("camera %s: %s %s %s, %s, %s", self.name, cam.get_vendor_name(), cam.get_model_name(),
                 self.device_id, fmt, s.trigger)  # fmt: skip

    def fire(self) -> None:
        """Software trigger (called by the service when a trigger arrives); nothing in the other modes."""
        if self.src.trigger != "software":
            return
        with self._lock:
            if self.cam is None:
                raise SourceError("camera not open")
            self.cam.software_trigger()

    def read(self) -> np.ndarray:
        A = self.Aravis
        waiting = self.src.trigger != "free_run"
        timeout_s = IDLE_POLL_S if waiting else FREE_RUN_TIMEOUT_S
        buf = self.stream.timeout_pop_buffer(int(timeout_s * 1e6))
        if buf is None:
            if not waiting:
                self._gone = True
                raise SourceError(f"no frame within {timeout_s:.1f} s")
            try:  # still there? a register read over the control channel fails when the camera is gone
                self.cam.get_pixel_format()
            except self.GLib.Error as exc:
                self._gone = True
                raise SourceError(f"camera gone: {exc.message}") from None
            raise SourceIdle()
        try:
            if buf.get_status() != A.BufferStatus.SUCCESS:
                raise SourceError(f"incomplete frame ({buf.get_status().value_nick})")
            return to_bgr(bytes(buf.get_data()), buf.get_image_width(), buf.get_image_height(), self.fmt)
        finally:
            self.stream.push_buffer(buf)

    def close(self) -> None:
        """Stop acquisition; a camera that is gone is let go on a daemon thread (Aravis' control-channel timeouts
        take seconds, and the grabber must report the camera down at once)."""
        with self._lock:
            cam, stream, self.cam, self.stream = self.cam, self.stream, None, None
        if cam is None:
            return
        if self._gone:
            threading.Thread(target=self._release, args=([cam, stream],), name=f"arv-release-{self.name}",
                             daemon=True).start()  # fmt: skip
        else:
            with contextlib.suppress(self.GLib.Error):
                cam.stop_acquisition()

    def _release(self, objs: list[Any]) -> None:
        with contextlib.suppress(self.GLib.Error):
            objs[0].stop_acquisition()
        objs.clear()  # the last references: ArvCamera's dispose runs here, not on the grab thread
