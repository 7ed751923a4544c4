"""Prometheus metrics of the station (``GET /metrics``), on the station's own registry.

Counters and the latency histogram are updated on the scoring thread (a lock and an add each); gauges that mirror
service state (camera up, broker connected, spool depth, archive queue) are read when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # *_created gauges only double the scrape size

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.read()
        up = GaugeMetricFamily("rdedge_camera_up", "1 while the camera delivers frames", labels=["camera", "state"])
        for cam, state in s["cameras"].items():
            up.add_metric([cam, state], 1.0 if state == "up" else 0.0)
        yield up
        yield GaugeMetricFamily("rdedge_broker_connected", "1 while connected to the MQTT broker (-1: no broker)",
                                value=s["broker"])  # fmt: skip
        yield GaugeMetricFamily("rdedge_spool_depth", "verdict messages waiting in the spool", value=s["spool_depth"])
        yield GaugeMetricFamily("rdedge_threshold", "NG threshold in force (score units)", value=s["threshold"])
        yield GaugeMetricFamily("rdedge_archive_queue_depth", "frames waiting for the archive writer",
                                value=s["archive_depth"])  # fmt: skip
        yield GaugeMetricFamily("rdedge_archive_dropped", "frames the archive dropped (writer busy)",
                                value=s["archive_dropped"])  # fmt: skip
        yield GaugeMetricFamily("rdedge_archive_bytes", "bytes in the NG archive", value=s["archive_bytes"])


class Metrics:
    """The station's metrics; ``state`` returns the scrape-time gauges (see :class:`_StateCollector`)."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.frames = Counter("rdedge_frames", "frames scored", ["camera", "verdict"], registry=self.registry)
        self.errors = Counter("rdedge_frame_errors", "frames that could not be scored", ["camera"],
                              registry=self.registry)  # fmt: skip
        self.latency = Histogram("rdedge_inference_seconds", "preprocess + inference per frame", ["camera"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.registry.register(_StateCollector(state))
