"""The station as a verdict output: counts and slots frames on the scoring thread, serves the page on its own.

Threads: uvicorn's server (the FastAPI app of :mod:`runtime.station.app` and its worker pool), the live-view encoder
(:mod:`runtime.station.live`), the archive writer (:mod:`runtime.station.archive`) and the threshold sidecar
watcher (:mod:`runtime.station.threshold`). :meth:`Station.on_verdict` is the only code on the per-frame path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn

from runtime.config import RuntimeConfig
from runtime.errors import RdedgeError
from runtime.outputs import Output, VerdictEvent
from runtime.spool import OutMessage
from runtime.station.app import create_app
from runtime.station.archive import Archive
from runtime.station.audit import AuditLog
from runtime.station.auth import LoginLimiter, Sessions, UserStore
from runtime.station.live import LiveState
from runtime.station.metrics import Metrics
from runtime.station.swap import ModelSwapper
from runtime.station.teach import Teach
from runtime.station.threshold import SidecarError, SidecarWatcher, read_sidecar

if TYPE_CHECKING:
    from runtime.service import Service

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class Station(Output):
    """The station page of one service.

    Args:
        cfg: the runtime config (its ``ui`` section, camera names, MQTT device id).
    """

    name = "station"

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.ui = ui = cfg.ui
        self.device = cfg.mqtt.device_id if cfg.mqtt else "rdedge"
        ui.state_dir.mkdir(parents=True, exist_ok=True)
        self.users = UserStore(ui.state_dir / "users.sqlite3")
        self.sessions = Sessions(ui.session_ttl_s)
        self.limiter = LoginLimiter(ui.login_max_failures, ui.login_window_s)
        self.audit = AuditLog(ui.state_dir / "audit.sqlite3")
        self.live = LiveState([c.name for c in cfg.cameras], ui.live_fps, ui.jpeg_quality, ui.history, ui.shifts)
        self.archive = Archive(ui.archive)
        self.metrics = Metrics(self._scrape)
        self.sidecar_path = ui.state_dir / "threshold.json"
        self.bundles_dir = ui.bundles_dir or ui.state_dir / "bundles"
        self.teach = Teach(
            ui.teach_dir or ui.state_dir / "teach", self.bundles_dir, ui.teach_image_size, ui.teach_steps
        )
        self.service: Service | None = None
        self._watcher: SidecarWatcher | None = None
        self.swapper: ModelSwapper | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------------------------------

    def start(self, service: Service) -> None:
        """Apply a saved threshold override, start the worker threads and the web server (raises if it cannot bind)."""
        self.service = service
        link = service.link
        if link is not None:
            topic, qos = f"{link.topics.base}/audit", link.cfg.qos

            def publish(body: bytes) -> None:
                link.enqueue_plain([OutMessage(topic, body, qos=qos)])

            self.audit.publish = publish
        self.swapper = ModelSwapper(service, self.bundles_dir,
                                    self.ui.state_dir / "active_bundle.json", self._swapped,
                                    self._swap_refused)  # fmt: skip
        self.swapper.restore()
        try:
            doc = read_sidecar(self.sidecar_path)
        except SidecarError as exc:
            log.error("threshold override ignored: %s", exc)
            doc = None
        if doc is not None:
            self._apply_threshold(doc)
        self._watcher = SidecarWatcher(self.sidecar_path, self._on_sidecar)
        self._watcher.start()
        self.live.start()
        self.archive.start()
        ssl = (
            {"ssl_certfile": str(self.ui.tls.cert_file), "ssl_keyfile": str(self.ui.tls.key_file)}
            if self.ui.tls
            else {}
        )
        config = uvicorn.Config(create_app(self), host=self.ui.host, port=self.ui.port, log_level="warning",
                                access_log=False, lifespan="off", **ssl)  # type: ignore[arg-type]  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="station-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RdedgeError(f"ui: cannot serve the station page on {self.ui.host}:{self.ui.port} (port in "
                                  "use, or no permission); see the log above")  # fmt: skip
            time.sleep(0.02)
        scheme = "https" if self.ui.tls else "http"
        log.info("station page on %s://%s:%d (%d user(s))", scheme, self.ui.host, self.ui.port, len(self.users.all()))
        if not self.users.all():
            log.warning("station: no users yet: rdedge station user add NAME --role admin --config FILE")

    def _serve(self) -> None:
        assert self._server is not None
        try:
            self._server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            log.error("station page: the web server stopped (see uvicorn's error above)")

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._watcher is not None:
            self._watcher.close()
        self.teach.close()
        self.live.close()
        self.archive.close()
        self.audit.close()
        self.users.close()

    def stats(self) -> dict[str, Any]:
        """``outputs.station`` of the stats document: archive counters, live frames encoded, swaps, teach state."""
        a = self.archive
        return {"archive": {"depth": a.depth, "written": a.written, "dropped": a.dropped, "deleted": a.deleted,
                            "failed": a.failed, "bytes": a.bytes},
                "live_encoded": {n: c.frames_encoded for n, c in self.live.cams.items()},
                "swaps": self.swapper.swaps if self.swapper else 0, "teach": self.teach.state}  # fmt: skip

    # -- scoring thread ----------------------------------------------------------------------------------------------

    def on_verdict(self, event: VerdictEvent) -> None:
        self.live.on_verdict(event)
        self.metrics.frames.labels(event.camera, "NG" if event.is_ng else "OK").inc()
        self.metrics.latency.labels(event.camera).observe(event.timings_ms.get("total", 0.0) / 1e3)
        if self.archive.wants(event):
            self.archive.offer(event)
        self.teach.on_verdict(event)

    def on_frame_error(self, camera: str, frame_seq: int, error: str) -> None:
        self.live.on_frame_error(camera)
        self.metrics.errors.labels(camera).inc()

    # -- threshold ---------------------------------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        assert self.service is not None and self.service.model is not None
        return self.service.model.threshold

    def _on_sidecar(self, doc: dict[str, Any]) -> None:
        assert self.service is not None
        self.service.call_between_frames(lambda: self._apply_threshold(doc))

    def _apply_threshold(self, doc: dict[str, Any]) -> None:
        """Set the model's threshold (scoring thread, or before the cameras start) and publish it retained."""
        svc = self.service
        assert svc is not None and svc.model is not None
        if doc.get("model_id") not in (None, svc.model.model_id):
            log.warning("threshold override in %s is for model %s, not the running %s: ignored", self.sidecar_path,
                        doc.get("model_id"), svc.model.model_id)  # fmt: skip
            return
        old = svc.model.threshold
        svc.model.threshold = doc["threshold"]
        log.info("threshold %.6g -> %.6g (override by %s, %s)", old, doc["threshold"], doc.get("by"), self.sidecar_path)
        if svc.link is not None:
            body = {"device": self.device, "ts": round(time.time(), 6), "threshold": doc["threshold"], "previous": old,
                    "by": doc.get("by"), "source": str(self.sidecar_path), "model_id": svc.model.model_id}  # fmt: skip
            topic = f"{svc.link.topics.base}/threshold"
            svc.link.enqueue_plain([OutMessage(topic, json.dumps(body).encode(), qos=1, retain=True)])

    def _swapped(self, old_id: str, new: Any, user: str) -> None:
        self.live.clear_history()  # the old model's scores are on another scale
        self.audit.record(user, "model_swap", new.bundle_dir.name, old_id, new.model_id)

    def _swap_refused(self, user: str, bundle: Any, why: str) -> None:
        current = self.service.model.model_id if self.service and self.service.model else None
        self.audit.record(user, "model_swap_refused", bundle.name, current, why[:500])

    def preview(self, value: float, camera: str | None = None) -> dict[str, Any]:
        """What ``value`` would have decided on the recent scores and on the reviewed archive frames."""
        scores = self.live.scores(camera)
        rev = self.archive.reviewed_scores()
        ng = sum(1 for s in scores if s >= value)
        good_ng = sum(1 for s in rev["good"] if s >= value)
        defect_ok = sum(1 for s in rev["defect"] if s < value)
        return {"value": value, "frames": len(scores), "ok": len(scores) - ng, "ng": ng,
                "good_marked": len(rev["good"]), "good_marked_ng": good_ng,
                "false_alarm_rate": good_ng / len(rev["good"]) if rev["good"] else None,
                "defect_marked": len(rev["defect"]), "defect_marked_ok": defect_ok}  # fmt: skip

    def threshold_doc(self, camera: str | None = None) -> dict[str, Any]:
        assert self.service is not None and self.service.model is not None
        try:
            override = read_sidecar(self.sidecar_path)
        except SidecarError as exc:
            override = {"error": str(exc)}
        return {"threshold": self.threshold, "bundle_threshold": self.service.model.manifest.threshold.value,
                "model_id": self.service.model.model_id,
                "override": override, "scores": self.live.scores(camera), "reviewed": self.archive.reviewed_scores(),
                "preview": self.preview(self.threshold, camera)}  # fmt: skip

    # -- state for the page and /metrics -----------------------------------------------------------------------------

    def _cameras(self) -> dict[str, str]:
        svc = self.service
        return {n: st.grabber.state for n, st in svc.cams.items()} if svc else {}

    def _broker(self) -> str:
        svc = self.service
        if svc is None or svc.link is None:
            return "none"
        return "connected" if svc.link.connected else "disconnected"

    def live_doc(self) -> dict[str, Any]:
        svc = self.service
        assert svc is not None and svc.model is not None
        cams = self.live.snapshot()
        states = self._cameras()
        for n, c in cams.items():
            c["state"] = states.get(n, "unknown")
        lat = svc.tracker.percentiles().get("total", {})
        return {"device": self.device, "ts": time.time(), "model_id": svc.model.model_id,
                "threshold": svc.model.threshold, "broker": self._broker(),
                "spool_depth": svc.spool.depth if svc.spool else None,
                "latency_ms": {"p50": lat.get("p50"), "p99": lat.get("p99")},
                "archive": {"depth": self.archive.depth, "dropped": self.archive.dropped,
                            "written": self.archive.written, "bytes": self.archive.bytes},
                "cameras": cams}  # fmt: skip

    def _scrape(self) -> dict[str, Any]:
        svc = self.service
        broker = self._broker()
        return {"cameras": self._cameras(), "broker": {"none": -1.0, "connected": 1.0}.get(broker, 0.0),
                "spool_depth": float(svc.spool.depth) if svc and svc.spool else 0.0,
                "threshold": self.threshold if svc and svc.model else float("nan"),
                "archive_depth": float(self.archive.depth), "archive_dropped": float(self.archive.dropped),
                "archive_bytes": float(self.archive.bytes)}  # fmt: skip
