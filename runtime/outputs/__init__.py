"""Where verdicts go besides MQTT: the service hands each scored frame once to a list of :class:`Output` s.

The service's per-frame path stays a straight line: after a verdict is committed to the spool it calls
:meth:`Output.on_verdict` on every output, in the scoring thread. An output must return in microseconds -- it may
update counters and drop a reference into a latest-value slot or a bounded queue (drops counted), and does its slow
work (JPEG encoding, disk writes, HTTP) on its own thread. Exceptions are logged by the service and never stop
inspection. Outputs are started after the model, spool and MQTT link are up and before the cameras, and closed in
reverse order before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from runtime.config import RuntimeConfig
    from runtime.service import Service


@dataclass(frozen=True)
class VerdictEvent:
    """One scored frame as outputs see it (read-only: the arrays are shared, never copy or write them in place).

    Attributes:
        camera: camera name.
        seq: the verdict's seq on MQTT (the local counter without a broker).
        frame_seq: the grabber's frame number.
        frame_ts: grab time, seconds since the epoch.
        ts: verdict time, seconds since the epoch.
        score: image anomaly score, model units.
        threshold: the threshold the verdict was decided with, score units.
        is_ng: ``score >= threshold``.
        model_id: the bundle's model id.
        trigger_id: the PLC trigger's id, ``None`` for continuous cameras.
        timings_ms: per-stage latency (``"total"`` included), milliseconds.
        image: the frame (or its ROI crop) the model saw, uint8 ``(H, W, 3)`` BGR as the camera delivered it.
        anomaly_map: ``(h, w)`` float32 map at model resolution.
    """

    camera: str
    seq: int
    frame_seq: int
    frame_ts: float
    ts: float
    score: float
    threshold: float
    is_ng: bool
    model_id: str
    trigger_id: str | int | None
    timings_ms: dict[str, float]
    image: np.ndarray = field(repr=False)
    anomaly_map: np.ndarray = field(repr=False)


class Output:
    """Base of every verdict output; override what you need (all default to doing nothing)."""

    name = "output"

    def start(self, service: Service) -> None:
        """Called once from :meth:`Service.open`, before the cameras start; may read ``service`` state later on."""

    def on_verdict(self, event: VerdictEvent) -> None:
        """A frame was scored (scoring thread: return fast, hand slow work to your own thread)."""

    def on_frame_error(self, camera: str, frame_seq: int, error: str) -> None:
        """A frame could not be scored (scoring thread)."""

    def on_trigger_error(self, camera: str, trigger_id: str | int, error: str) -> None:
        """A trigger got no verdict (no fresh frame, unscorable frame, queue full, shutting down); any thread."""

    def stats(self) -> dict[str, Any] | None:
        """This output's part of the stats document and status topic (``outputs.<name>``), or ``None``."""
        return None

    def close(self) -> None:
        """Stop threads and release files; called once at shutdown."""


def create_line_outputs(cfg: RuntimeConfig) -> list[Output]:
    """The line interfaces the config enables, in start order (each imports its extra only when enabled).

    Raises:
        MissingExtraError: an enabled interface's extra is not installed (the message names ``rdedge[...]``).
    """
    outs: list[Output] = []
    if cfg.modbus.enabled:
        from runtime.outputs.modbus import ModbusOutput

        outs.append(ModbusOutput(cfg))
    if cfg.opcua.enabled:
        from runtime.outputs.opcua import OpcUaOutput

        outs.append(OpcUaOutput(cfg))
    if cfg.sparkplug.enabled:
        from runtime.outputs.sparkplug import SparkplugOutput

        outs.append(SparkplugOutput(cfg))
    return outs
