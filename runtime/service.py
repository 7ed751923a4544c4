"""The inspection service: cameras -> model -> spool -> MQTT, under systemd (``rdedge run --config FILE``).

Threads: one grabber per camera (:mod:`runtime.capture`), paho's network thread and the spool pump
(:mod:`runtime.mqtt`), a stats timer, the systemd watchdog pinger, and the *scoring loop* in the calling thread. The
loop goes round-robin over the cameras (one model, no lock needed): a continuous camera is scored whenever it has a
frame newer than the last one scored; a triggered camera only when a trigger is queued, on the first frame grabbed
after the trigger arrived. Every verdict is committed to the spool before it is published (docs/mqtt.md).

Shutdown (SIGTERM/SIGINT or ``stop_event``): ``STOPPING=1``, the frame in flight is finished, grabbers stop, the spool
is flushed for up to 2 s (only while connected), ``stopped`` is published (retained), then disconnect -- well inside
systemd's default 5 s budget we promise. When every camera has ended (folder once, video without loop) the service
flushes (waiting up to ``END_FLUSH_S`` for the broker) and exits 0.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from runtime.capture import Frame, FrameGrabber
from runtime.config import CameraConfig, RuntimeConfig
from runtime.engine import AnomalyModel, Prediction
from runtime.errors import RdedgeError
from runtime.health import LatencyTracker, Watchdog, sd_notify
from runtime.mqtt import MqttLink, TriggerRequest
from runtime.outputs import Output, VerdictEvent
from runtime.spool import OutMessage, Spool, SpoolFullError

log = logging.getLogger(__name__)

STOP_FLUSH_S = 2.0
END_FLUSH_S = 10.0
TRIGGER_QUEUE_MAX = 64
LOW_CAPACITY_VERDICTS = 1000  # warn (once per streak) when the spool has room for fewer verdicts than this


@dataclass
class _CamState:
    cfg: CameraConfig
    grabber: FrameGrabber
    last_seq: int = -1
    scored: int = 0
    ng: int = 0
    errors: int = 0
    triggers: collections.deque[TriggerRequest] = field(default_factory=collections.deque)
    serving: int = 0  # 1 while a trigger of this camera waits for its fresh frame
    triggers_refused: int = 0  # error replies because the queue was full


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class Service:
    """One running inspection service; :func:`run_service` is the entry point."""

    def __init__(self, cfg: RuntimeConfig, stop_event: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop_event
        self.started = time.monotonic()
        self.tracker = LatencyTracker()
        self.watchdog = Watchdog()
        self.model: AnomalyModel | None = None
        self.spool: Spool | None = None
        self.link: MqttLink | None = None
        self.cams: dict[str, _CamState] = {}
        self._trigger_lock = threading.Lock()
        self._trigger_event = threading.Event()
        self._local_seq = 0
        self._ready = False
        self.frames_scored = 0
        self.frames_ng = 0
        self.frame_errors = 0
        self._saved: collections.deque[Path] = collections.deque()
        self._stats_thread: threading.Thread | None = None
        self._fps_mark = (self.started, 0)
        self._low_capacity_warned = False
        self.outputs: list[Output] = []  # the station page, ... (runtime/outputs.py)
        self._between: collections.deque[Callable[[], None]] = collections.deque()

    # -- start-up ----------------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Load the model, open spool and MQTT, start the grabbers. Raises :class:`RdedgeError` on bad inputs."""
        cfg = self.cfg
        t0 = time.monotonic()
        self.model = AnomalyModel(
            cfg.bundle, cfg.backend, verify=True, threshold=cfg.threshold, trusted_keys=cfg.trusted_keys
        )
        self.model.warmup(1)
        log.info("bundle %s ready in %.2f s (model %s, threshold %.6g)", cfg.bundle, time.monotonic() - t0,
                 self.model.model_id, self.model.threshold)  # fmt: skip
        if cfg.mqtt is not None:
            try:
                self.spool = Spool(cfg.spool.path, cfg.spool.max_messages, cfg.spool.max_age_s,
                                   min_free_bytes=int(cfg.spool.min_free_mb * 2**20))  # fmt: skip
            except (sqlite3.Error, OSError) as exc:
                raise RdedgeError(f"spool {cfg.spool.path}: cannot open: {exc}") from None
            triggered = [c.name for c in cfg.cameras if c.mode == "triggered"]
            self.link = MqttLink(cfg.mqtt, self.spool, [c.name for c in cfg.cameras], triggered, self._on_trigger)
            self.link.start()
        else:
            log.warning("mqtt: null -- verdicts are only logged, nothing is published or spooled")
        if cfg.alerts.save_dir is not None:
            cfg.alerts.save_dir.mkdir(parents=True, exist_ok=True)
            self._saved.extend(sorted(cfg.alerts.save_dir.glob("*.jpg"), key=lambda p: p.stat().st_mtime))
        for cam in cfg.cameras:
            self.cams[cam.name] = _CamState(cam, FrameGrabber(cam, on_state=self._on_camera_state))
        if cfg.ui.enabled:
            from runtime.station import create_station  # rdedge[ui]; MissingExtraError names the extra

            self.outputs.append(create_station(cfg))
        from runtime.outputs import create_line_outputs  # Modbus, OPC UA: each behind its extra

        self.outputs.extend(create_line_outputs(cfg))
        for out in self.outputs:
            out.start(self)
        for st in self.cams.values():
            st.grabber.start()
        self.watchdog.start()
        self._stats_thread = threading.Thread(target=self._stats_loop, name="stats", daemon=True)
        self._stats_thread.start()
        # READY means "up and will score when frames come": the model is loaded and warmed up (one real inference),
        # the spool is open and MQTT connects in the background. It must not wait for a frame: with a camera that is
        # absent at start systemd would otherwise kill the unit after TimeoutStartSec and restart it in a loop.
        self._mark_ready()

    def _mark_ready(self) -> None:
        if self._ready:
            return
        self._ready = True
        sd_notify("READY=1", f"STATUS={self._status_line()}")
        log.info("ready %.2f s after start: %s", time.monotonic() - self.started, self._status_line())

    def _status_line(self) -> str:
        """One line for systemd's STATUS=: cameras and their states, spool depth and dead letters."""
        cams = ", ".join(f"{n} {st.grabber.state}" for n, st in self.cams.items())
        line = f"{self.frames_scored} frame(s) scored; cameras: {cams}"
        for out in self.outputs:  # line interfaces: "modbus up (1 client)", ...
            st = out.stats()
            if st is not None and "state" in st:
                line += f"; {out.name} {st['state']}"
        if self.spool is not None:
            line += f"; spool {self.spool.depth} pending"
            if self.spool.dead:
                line += f", {self.spool.dead} REFUSED by the broker (rdedge spool replay-dead)"
        return line

    def _on_camera_state(self, camera: str, state: str) -> None:
        if self.link is not None:
            self.link.set_camera_status(camera, state)

    def trigger(self, camera: str, trigger_id: str | int) -> None:
        """Queue a trigger from a PLC interface (Modbus, OPC UA): served like an MQTT trigger, any thread.

        The verdict reaches the outputs with ``trigger_id``; a trigger that gets none is reported to them through
        :meth:`Output.on_trigger_error`.
        """
        self._on_trigger(TriggerRequest(camera, trigger_id, None, None, time.monotonic()))

    def _trigger_failed(self, camera: str, req: TriggerRequest, why: str) -> None:
        if self.link is not None:
            self.link.publish_error(camera, why, req.id, req.response_topic, req.correlation)
        for out in self.outputs:
            try:
                out.on_trigger_error(camera, req.id, why)
            except Exception:
                log.exception("output %s failed on a trigger error", out.name)

    def _on_trigger(self, req: TriggerRequest) -> None:
        st = self.cams.get(req.camera)
        if st is None:
            return
        with self._trigger_lock:
            full = len(st.triggers) >= TRIGGER_QUEUE_MAX
            if full:
                st.triggers_refused += 1
            else:
                st.triggers.append(req)
        if full:
            self._trigger_failed(req.camera, req, f"trigger queue full ({TRIGGER_QUEUE_MAX})")
            return
        self._trigger_event.set()

    # -- scoring loop ------------------------------------------------------------------------------------------------

    def loop(self) -> None:
        """Score until stopped or every camera has ended."""
        cams = list(self.cams.values())
        poll = 0.1 / len(cams)
        while not self.stop.is_set():
            self.watchdog.progress()
            while self._between:  # threshold changes, model swaps: applied between two frames
                try:
                    self._between.popleft()()
                except Exception:
                    log.exception("between-frames call failed")
            busy = False  # scored or served something this round
            waited = False  # blocked in a live camera's latest(): no need to sleep below
            live = 0
            for st in cams:
                if self.stop.is_set():
                    break
                ended = st.grabber.state == "ended"
                if st.cfg.mode == "continuous":
                    frame = st.grabber.latest(timeout=0.0 if busy else poll, newer_than=st.last_seq)
                    waited = waited or (not busy and not ended)
                    if frame is not None:
                        self._score(st, frame, None)
                        busy = True
                        live += 1
                    elif not ended:
                        live += 1
                else:
                    if self._serve_trigger(st):
                        busy = True
                    if not ended:
                        live += 1
            if live == 0:
                log.info("every camera has ended")
                return
            if not busy and not waited:  # only triggered (or ended) cameras: sleep until a trigger, no busy loop
                self._trigger_event.wait(0.1)
                self._trigger_event.clear()

    def call_between_frames(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the scoring thread before the next frame is scored (any thread may call this)."""
        self._between.append(fn)

    def _serve_trigger(self, st: _CamState) -> bool:
        with self._trigger_lock:
            req = st.triggers.popleft() if st.triggers else None
            if req is not None:
                st.serving = 1
        if req is None:
            return False
        try:
            self._serve_one(st, req)
        finally:
            st.serving = 0
        return True

    def _serve_one(self, st: _CamState, req: TriggerRequest) -> None:
        wall_at_trigger = time.time() - (time.monotonic() - req.received)
        deadline = time.monotonic() + st.cfg.no_frame_timeout_s
        st.grabber.fire()  # GenICam software trigger: the camera exposes now (other sources stream anyway)
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.watchdog.progress()
            frame = st.grabber.latest(timeout=min(0.1, max(0.0, deadline - time.monotonic())), newer_than=st.last_seq)
            if frame is None:
                if st.grabber.state == "ended":
                    break
                continue
            st.last_seq = frame.seq
            if frame.timestamp >= wall_at_trigger:  # grabbed after the trigger arrived: fresh
                self._score(st, frame, req)
                return
        if self.stop.is_set():
            why = "runtime shutting down"
        elif st.grabber.state == "ended":
            why = "camera ended"
        else:
            why = f"no fresh frame within {st.cfg.no_frame_timeout_s} s"
        log.warning("camera %s: trigger %r not served: %s", st.cfg.name, req.id, why)
        self._trigger_failed(st.cfg.name, req, why)

    def _score(self, st: _CamState, frame: Frame, trigger: TriggerRequest | None) -> None:
        assert self.model is not None
        st.last_seq = frame.seq
        try:
            pred = self.model.predict(frame.image, roi=st.cfg.roi)
            if not math.isfinite(pred.score):  # a broken model must not turn into an "OK" (NaN >= t is False)
                raise ValueError(f"non-finite score {pred.score}")
        except ValueError as exc:  # unsupported frame, ROI outside the frame, NaN: keep serving, log rate-limited
            self.frame_errors += 1
            st.errors += 1
            if st.errors == 1 or st.errors % 100 == 0:
                log.error("camera %s frame %d: cannot score (%d so far): %s", st.cfg.name, frame.seq, st.errors, exc)
            if trigger is not None:
                self._trigger_failed(st.cfg.name, trigger, f"cannot score: {exc}")
            for out in self.outputs:
                try:
                    out.on_frame_error(st.cfg.name, frame.seq, str(exc))
                except Exception:
                    log.exception("output %s failed on a frame error", out.name)
            return
        self.tracker.record(pred.timings_ms)
        st.scored += 1
        self.frames_scored += 1
        if pred.is_ng:
            st.ng += 1
            self.frames_ng += 1
        image_path, jpeg = self._overlay(st, frame, pred) if pred.is_ng else (None, None)
        seq = self._emit(st, frame, pred, trigger, image_path, jpeg is not None)
        if jpeg is not None and self.link is not None:
            self.link.publish_volatile(self.link.topics.alert_image(st.cfg.name), jpeg, qos=0)
        if self.outputs:
            self._to_outputs(st, frame, pred, trigger, seq)
        log.debug("camera %s seq %d: %s score %.5f", st.cfg.name, seq, "NG" if pred.is_ng else "OK", pred.score)
        if st.scored == 1:
            log.info("camera %s: first verdict %.2f s after start", st.cfg.name, time.monotonic() - self.started)

    def _to_outputs(
        self, st: _CamState, frame: Frame, pred: Prediction, trigger: TriggerRequest | None, seq: int
    ) -> None:
        assert self.model is not None
        roi, img = st.cfg.roi, frame.image
        if roi is not None:
            img = img[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]
        ev = VerdictEvent(st.cfg.name, seq, frame.seq, frame.timestamp, time.time(), pred.score, self.model.threshold,
                          pred.is_ng, self.model.model_id, trigger.id if trigger else None, pred.timings_ms, img,
                          pred.anomaly_map)  # fmt: skip
        for out in self.outputs:
            try:
                out.on_verdict(ev)
            except Exception:  # an output must never stop inspection
                log.exception("output %s failed on camera %s seq %d", out.name, st.cfg.name, seq)

    def _overlay(self, st: _CamState, frame: Frame, pred: Prediction) -> tuple[str | None, bytes | None]:
        alerts = self.cfg.alerts
        if alerts.save_dir is None and not alerts.publish_image:
            return None, None
        from runtime.overlay import encode_jpeg, overlay_heatmap

        img = frame.image
        roi = st.cfg.roi
        if roi is not None:
            img = img[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]
        assert self.model is not None
        try:
            jpeg = encode_jpeg(overlay_heatmap(img, pred.anomaly_map, self.model.threshold), alerts.jpeg_quality)
        except (ValueError, Exception) as exc:  # an overlay must never stop inspection
            log.error("camera %s: overlay failed: %s", st.cfg.name, exc)
            return None, None
        path = None
        if alerts.save_dir is not None:
            p = alerts.save_dir / f"{st.cfg.name}_{int(frame.timestamp * 1000)}_{frame.seq}.jpg"
            try:
                p.write_bytes(jpeg)
                path = str(p)
                self._saved.append(p)
                while len(self._saved) > alerts.max_saved:
                    self._saved.popleft().unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot save overlay %s: %s", p, exc)
        return path, (jpeg if alerts.publish_image else None)

    def _emit(
        self,
        st: _CamState,
        frame: Frame,
        pred: Prediction,
        trigger: TriggerRequest | None,
        image_path: str | None,
        image_published: bool,
    ) -> int:
        assert self.model is not None
        now = time.time()
        cam = st.cfg.name
        device = self.cfg.mqtt.device_id if self.cfg.mqtt else "rdedge"
        latency = {k: round(v, 3) for k, v in pred.timings_ms.items()}
        latency["frame_to_result"] = round(max(0.0, now - frame.timestamp) * 1e3, 3)
        verdict = "NG" if pred.is_ng else "OK"
        base: dict[str, Any] = {
            "device": device,
            "camera": cam,
            "frame_seq": frame.seq,
            "frame_ts": round(frame.timestamp, 6),
            "ts": round(now, 6),
            "score": round(pred.score, 6),
            "threshold": round(self.model.threshold, 6),
            "verdict": verdict,
            "model_id": self.model.model_id,
        }
        if pred.probability is not None:  # the bundle's label-tuned classifier (manifest.classifier.rule decides)
            base["probability"] = round(pred.probability, 6)
        if trigger is not None:
            base["trigger_id"] = trigger.id
        if self.link is None:
            self._local_seq += 1
            log.info("%s %s score %.5f (seq %d)", cam, verdict, pred.score, self._local_seq)
            return self._local_seq
        link = self.link
        qos = link.cfg.qos

        def build(seq: int) -> list[OutMessage]:
            result = _json({"seq": seq, **base, "latency_ms": latency})
            msgs = [OutMessage(link.topics.result(cam), result, qos=qos)]
            if pred.is_ng:
                alert = {"seq": seq, **base, "image_path": image_path,
                         "image_topic": link.topics.alert_image(cam) if image_published else None}  # fmt: skip
                msgs.append(OutMessage(link.topics.alert(cam), _json(alert), qos=qos))
            if trigger is not None and trigger.response_topic:
                msgs.append(OutMessage(trigger.response_topic, result, qos=qos, correlation=trigger.correlation))
            return msgs

        try:
            seq, _items = link.enqueue(build)
        except sqlite3.Error as exc:  # reserve reached, disk full, read-only, corrupt: exit non-zero
            what = "spool full" if isinstance(exc, SpoolFullError) else "cannot store a verdict"
            stored = link.spool.depth + link.spool.dead
            raise RdedgeError(
                f"spool {self.cfg.spool.path}: {what}: {exc}; the {stored} message(s) already stored are intact "
                f"(last seq {link.spool.peek_seq() - 1}) and are delivered once space is freed and the service runs "
                "again"
            ) from exc
        return seq

    # -- stats ---------------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The ``<prefix>/<device>/stats`` document (docs/mqtt.md); ``fps`` covers the time since the last call."""
        now = time.monotonic()
        dt = now - self._fps_mark[0]
        fps = (self.frames_scored - self._fps_mark[1]) / dt if dt > 0 else 0.0
        self._fps_mark = (now, self.frames_scored)
        cams: dict[str, dict[str, Any]] = {
            n: {**st.grabber.stats(), "scored": st.scored, "ng": st.ng} for n, st in self.cams.items()
        }
        with self._trigger_lock:
            for n, st in self.cams.items():
                if st.cfg.mode == "triggered":
                    cams[n]["triggers_in_flight"] = len(st.triggers) + st.serving
                    cams[n]["triggers_refused"] = st.triggers_refused
            in_flight = sum(len(st.triggers) + st.serving for st in self.cams.values())
            refused = sum(st.triggers_refused for st in self.cams.values())
        doc: dict[str, Any] = {
            "device": self.cfg.mqtt.device_id if self.cfg.mqtt else "rdedge",
            "ts": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "model_id": self.model.model_id if self.model else None,
            "fps": round(fps, 3),
            "frames_scored": self.frames_scored,
            "frames_ng": self.frames_ng,
            "frame_errors": self.frame_errors,
            "frames_dropped": sum(st.grabber.frames_dropped for st in self.cams.values()),
            "latency_ms": {**self.tracker.percentiles(), **(self.link.ack_latency.percentiles() if self.link else {})},
            "cameras": cams,
            "triggers": {"in_flight": in_flight, "queue_max": TRIGGER_QUEUE_MAX, "refused_queue_full": refused},
        }
        outs = {out.name: o for out in self.outputs if (o := out.stats()) is not None}
        if outs:
            doc["outputs"] = outs
        if self.spool is not None:
            cap = self.spool.capacity()
            doc["spool"] = {"depth": self.spool.depth, "dropped": self.spool.dropped,
                            "dropped_total": self.spool.dropped_total, "dead_letter": self.spool.dead,
                            "free_bytes": cap.free_bytes, "reserve_bytes": cap.reserve_bytes,
                            "verdict_bytes": cap.verdict_bytes, "verdicts_fit": cap.verdicts_fit}  # fmt: skip
        if self.link is not None:
            doc["mqtt"] = {"connected": self.link.connected, "reconnects": self.link.reconnects,
                           "refusals": self.link.refusals, "inflight": self.link.inflight,
                           "rejected": self.link.rejected, "refused_topics": dict(self.link.refused_topics),
                           "bad_triggers": self.link.bad_triggers,
                           "skipped_offline": self.link.skipped_offline}  # fmt: skip
        return doc

    def _stats_loop(self) -> None:
        if self.cfg.mqtt is None:
            return
        interval = self.cfg.mqtt.stats_interval_s
        while not self.stop.wait(interval):
            try:
                if self.spool is not None:
                    self.spool.expire()
                doc = self.stats()
                self._check_capacity(doc.get("spool"))
                if self.link is not None:
                    self.link.publish_volatile(self.link.topics.stats, _json(doc), qos=0)
                    for name, out in doc.get("outputs", {}).items():  # <prefix>/<device>/line/<name>/status, retained
                        if "state" in out:
                            self.link.set_camera_status(f"line/{name}", str(out["state"]))
                sd_notify(f"STATUS={self._status_line()}; {doc['fps']} fps")
            except Exception:  # stats must never take the service down
                log.exception("stats failed")

    def _check_capacity(self, spool: dict[str, Any] | None) -> None:
        """Warn once per streak when the spool has room for fewer than LOW_CAPACITY_VERDICTS more verdicts."""
        if spool is None or self.spool is None or self.spool.min_free_bytes <= 0:
            return
        low = spool["verdicts_fit"] < LOW_CAPACITY_VERDICTS
        if low and not self._low_capacity_warned:
            log.warning("spool %s: room for only ~%d more verdict(s) above the %d-byte reserve (%d bytes free on its "
                        "file system); the service stops when it is full", self.cfg.spool.path,
                        spool["verdicts_fit"], spool["reserve_bytes"], spool["free_bytes"])  # fmt: skip
        self._low_capacity_warned = low

    # -- shutdown ------------------------------------------------------------------------------------------------------

    def close(self, ended: bool) -> None:
        """Stop everything in reverse order of :meth:`open`; idempotent enough for error paths."""
        for st in self.cams.values():
            st.grabber.stop(timeout=0.5)
        for out in reversed(self.outputs):
            try:
                out.close()
                if self.link is not None and "state" in (out.stats() or {}):
                    self.link.set_camera_status(f"line/{out.name}", "stopped")
            except Exception:
                log.exception("output %s: close failed", out.name)
        self.watchdog.stop()
        if self.link is not None:
            if ended:  # end of input: give the broker up to END_FLUSH_S to take the backlog (SIGTERM cuts it short)
                deadline = time.monotonic() + END_FLUSH_S
                while not self.stop.is_set() and time.monotonic() < deadline and self.link.spool.depth > 0:
                    time.sleep(0.05)
            self.link.close(flush_s=STOP_FLUSH_S)
        self.stop.set()
        if self._stats_thread is not None:
            self._stats_thread.join(timeout=1)
        if self.spool is not None:
            log.info("summary: %d frame(s) scored (%d NG, %d unscorable) in %.1f s; spool depth %d, dropped %d, "
                     "refused by the broker %d; %d reconnect(s)", self.frames_scored, self.frames_ng,
                     self.frame_errors, time.monotonic() - self.started, self.spool.depth, self.spool.dropped,
                     self.spool.dead, self.link.reconnects if self.link else 0)  # fmt: skip
            self.spool.close()
        else:
            log.info("summary: %d frame(s) scored (%d NG, %d unscorable) in %.1f s", self.frames_scored,
                     self.frames_ng, self.frame_errors, time.monotonic() - self.started)  # fmt: skip
        if self.model is not None:
            self.model.close()


def run_service(cfg: RuntimeConfig, stop_event: threading.Event | None = None) -> int:
    """Run the inspection service until SIGTERM/SIGINT, ``stop_event``, or every camera has ended.

    Args:
        cfg: validated runtime config.
        stop_event: set it to stop (tests, embedding); SIGTERM/SIGINT set it too when called from the main thread.

    Returns:
        0 on a clean stop or end of input.

    Raises:
        RdedgeError: bad bundle (missing, corrupt manifest, hash mismatch, wrong engine), unusable spool, ...
    """
    stop = stop_event or threading.Event()
    restore: list[tuple[int, Any]] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s received: finishing the frame in flight and stopping", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore.append((sig, signal.signal(sig, _on_signal)))
    svc = Service(cfg, stop)
    ended = False
    try:
        svc.open()
        svc.loop()
        ended = not stop.is_set()
    finally:
        if not ended:
            sd_notify("STOPPING=1")
        svc.close(ended=ended)
        for signum, handler in restore:
            signal.signal(signum, handler)
    return 0
