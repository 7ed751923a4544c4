"""Sparkplug B edge node (``rdedge[sparkplug]``): a Sparkplug device per camera, verdicts as DDATA (docs/sparkplug.md).

Topics ``spBv1.0/<group>/<TYPE>/<edge node>[/<camera>]``. On every connect: NBIRTH (``bdSeq``, ``Node
Control/Rebirth``, node counters; seq 0), then one DBIRTH per camera, then what was spooled while offline replayed
as DDATA with ``is_historical`` and the verdict's own timestamps. Every scored frame is one DDATA (Verdict, IsNg,
Score, Threshold, Seq, FrameSeq, ModelId, TriggerId); node counters go out as NDATA at most once a second. ``seq``
runs 0..255 over every message of the node and wraps. The NDEATH is the MQTT will (QoS 1) and carries the same
``bdSeq`` as the NBIRTH of that session; ``bdSeq`` (0..255) advances per connection and is kept in
``state_dir/bdseq`` so a restart does not reuse the one of the session the broker just buried. An NCMD
``Node Control/Rebirth = true`` makes the node publish NBIRTH + DBIRTHs again. A clean stop publishes NDEATH itself
(a broker does not send the will on a clean DISCONNECT).

Threads: paho's network thread, and the publisher thread that encodes and publishes; the scoring thread only appends
to a bounded queue (full: the verdict is dropped and counted). The offline spool is in memory (``spool_max``
verdicts, oldest dropped and counted): the at-least-once record of every verdict is the service's MQTT spool.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from runtime.config import RuntimeConfig
from runtime.errors import MissingExtraError, RdedgeError
from runtime.outputs import Output, VerdictEvent

if TYPE_CHECKING:
    from runtime.service import Service

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
NDATA_PERIOD_S = 1.0


class SparkplugOutput(Output):
    """The Sparkplug B edge node of one service.

    Args:
        cfg: the runtime config (its ``sparkplug`` section, cameras and MQTT device id).

    Raises:
        MissingExtraError: protobuf (``rdedge[sparkplug]``) is not installed.
    """

    name = "sparkplug"

    def __init__(self, cfg: RuntimeConfig) -> None:
        try:
            from runtime.outputs import sparkplug_pb
        except ImportError:
            raise MissingExtraError("protobuf", "sparkplug", "Sparkplug B payloads") from None
        self.pb = sparkplug_pb
        self.scfg = s = cfg.sparkplug
        self.node = s.edge_node_id or (cfg.mqtt.device_id if cfg.mqtt else "rdedge")
        self.cameras = [c.name for c in cfg.cameras]
        self.base = f"{NAMESPACE}/{s.group_id}"
        self.service: Service | None = None
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=s.queue_size)
        self._spool: collections.deque[VerdictEvent] = collections.deque()
        self._lock = threading.Lock()  # seq, connected, spool
        self._seq = 0
        self._bdseq_path = s.state_dir / "bdseq"
        self.bdseq = 0
        self.connected = False
        self.births = 0
        self.sent = 0
        self.replayed = 0
        self.dropped_queue = 0
        self.dropped_spool = 0
        self.rebirths = 0
        self._last: dict[str, VerdictEvent] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._client: Any = None

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"{self.base}/{kind}/{self.node}" + (f"/{device}" if device else "")

    # -- bdSeq and seq -------------------------------------------------------------------------------------------

    def _next_bdseq(self) -> int:
        """Advance and persist bdSeq (0..255) for the next connection."""
        try:
            prev = int(self._bdseq_path.read_text().strip())
        except (OSError, ValueError):
            prev = -1
        self.bdseq = (prev + 1) % 256
        tmp = self._bdseq_path.with_suffix(".tmp")
        tmp.write_text(f"{self.bdseq}\n")
        os.replace(tmp, self._bdseq_path)
        return self.bdseq

    def _take_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    def _death(self) -> bytes:
        p = self.pb.Payload()
        p.timestamp = int(time.time() * 1000)
        self.pb.add_metric(p, "bdSeq", self.pb.INT64, self.bdseq)
        return bytes(p.SerializeToString())

    # -- life cycle ----------------------------------------------------------------------------------------------

    def start(self, service: Service) -> None:
        """Connect (in the background: a broker that is down is retried) and start the publisher thread."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.service = service
        s = self.scfg
        try:
            s.state_dir.mkdir(parents=True, exist_ok=True)
            self._next_bdseq()
        except OSError as exc:
            raise RdedgeError(f"sparkplug.state_dir {s.state_dir}: {exc}") from None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rdedge-spb-{s.group_id}-{self.node}",
                        protocol=MQTTProtocolVersion.MQTTv311, clean_session=True)  # fmt: skip
        if s.username:
            c.username_pw_set(s.username, os.environ.get(s.password_env or "") or None)
        c.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)
        c.reconnect_delay_set(s.reconnect_min_s, max(s.reconnect_min_s, 30))
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c
        c.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        c.loop_start()
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)
        self._thread.start()
        log.info("sparkplug: edge node %s/%s -> %s:%d (bdSeq %d)", s.group_id, self.node, s.host, s.port,
                 self.bdseq)  # fmt: skip

    def close(self) -> None:
        """Publish what is queued, then NDEATH (a clean disconnect does not fire the will), then disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)
        c = self._client
        if c is None:
            return
        if self.connected:
            try:
                c.publish(self.topic("NDEATH"), self._death(), qos=1).wait_for_publish(2)
            except (RuntimeError, ValueError) as exc:
                log.warning("sparkplug: NDEATH not sent: %s", exc)
        c.disconnect()
        c.loop_stop()
        log.info("sparkplug: stopped (NDEATH bdSeq %d)", self.bdseq)

    # -- paho callbacks (network thread) --------------------------------------------------------------------------

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            log.warning("sparkplug: broker refused the connection: %s", rc)
            return
        client.subscribe(self.topic("NCMD"), qos=1)
        self._put(("birth", None), block=True)

    def _on_disconnect(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        with self._lock:
            was = self.connected
            self.connected = False
        if was:
            log.warning("sparkplug: broker connection lost (%s); spooling verdicts", rc)
        if not self._stop.is_set():  # the next session gets a new bdSeq, and its will must carry it
            try:
                self._next_bdseq()
            except OSError as exc:
                log.error("sparkplug: cannot persist bdSeq: %s", exc)
            client.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        try:
            p = self.pb.Payload()
            p.ParseFromString(msg.payload)
        except Exception:
            log.warning("sparkplug: unparsable NCMD on %s (ignored)", msg.topic)
            return
        for m in p.metrics:
            if m.name == REBIRTH and m.boolean_value:
                self.rebirths += 1
                log.info("sparkplug: rebirth requested")
                self._put(("birth", None), block=True)

    # -- from the service (scoring thread) ------------------------------------------------------------------------

    def _put(self, item: tuple[str, Any], block: bool = False) -> None:
        try:
            self._q.put(item, block=block, timeout=1.0 if block else None)
        except queue.Full:
            self.dropped_queue += 1

    def on_verdict(self, event: VerdictEvent) -> None:
        """Hand the verdict to the publisher thread (queue full: dropped and counted)."""
        self._put(("verdict", event))

    # -- the publisher thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        last_ndata = 0.0
        while True:
            try:
                kind, item = self._q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                kind, item = "tick", None
            try:
                if kind == "birth":
                    self._birth()
                elif kind == "verdict":
                    self._verdict(item)
                now = time.monotonic()
                if self.connected and now - last_ndata >= NDATA_PERIOD_S and kind != "birth":
                    last_ndata = now
                    self._ndata()
            except Exception:  # never let one message stop the publisher
                log.exception("sparkplug: publishing %s failed", kind)

    def _publish(self, topic: str, payload: Any) -> bool:
        """QoS 0 as the spec wants for BIRTH/DATA; False when paho has no connection (the caller spools)."""
        info = self._client.publish(topic, payload.SerializeToString(), qos=0)
        if info.rc != 0:
            self.connected = False
            return False
        self.sent += 1
        return True

    def _node_metrics(self, p: Any, birth: bool) -> None:
        pb, svc = self.pb, self.service
        if birth:
            pb.add_metric(p, "bdSeq", pb.INT64, self.bdseq)
            pb.add_metric(p, REBIRTH, pb.BOOLEAN, False)
            pb.add_metric(p, "Properties/Cameras", pb.STRING, ",".join(self.cameras))
        model = svc.model.model_id if svc is not None and svc.model is not None else ""
        pb.add_metric(p, "ModelId", pb.STRING, model)
        pb.add_metric(p, "FramesScored", pb.UINT64, svc.frames_scored if svc else 0)
        pb.add_metric(p, "FramesNg", pb.UINT64, svc.frames_ng if svc else 0)
        pb.add_metric(p, "FrameErrors", pb.UINT64, svc.frame_errors if svc else 0)

    def _result_metrics(self, p: Any, ev: VerdictEvent | None, historical: bool = False) -> None:
        pb = self.pb
        ts = int(ev.ts * 1000) if ev is not None else None
        g = (lambda f: getattr(ev, f)) if ev is not None else (lambda f: None)
        verdict = None if ev is None else ("NG" if ev.is_ng else "OK")
        tid = None if ev is None or ev.trigger_id is None else str(ev.trigger_id)
        for name, dt, val in (("Verdict", pb.STRING, verdict), ("IsNg", pb.BOOLEAN, g("is_ng")),
                              ("Score", pb.DOUBLE, g("score")), ("Threshold", pb.DOUBLE, g("threshold")),
                              ("Seq", pb.UINT64, g("seq")), ("FrameSeq", pb.UINT64, g("frame_seq")),
                              ("ModelId", pb.STRING, g("model_id")), ("TriggerId", pb.STRING, tid)):  # fmt: skip
            pb.add_metric(p, name, dt, val, timestamp_ms=ts, historical=historical)

    def _birth(self) -> None:
        """NBIRTH (seq 0) + DBIRTH per camera, then the offline spool as historical DDATA."""
        pb = self.pb
        with self._lock:
            self._seq = 0
            p = pb.Payload()
            p.timestamp = int(time.time() * 1000)
            p.seq = self._take_seq()
            self._node_metrics(p, birth=True)
            if not self._publish(self.topic("NBIRTH"), p):
                return  # lost the broker again: the next on_connect births
            for cam in self.cameras:
                d = pb.Payload()
                d.timestamp = int(time.time() * 1000)
                d.seq = self._take_seq()
                state = self.service.cams[cam].grabber.state if self.service and cam in self.service.cams else ""
                pb.add_metric(d, "State", pb.STRING, state)
                self._result_metrics(d, self._last.get(cam))
                self._publish(self.topic("DBIRTH", cam), d)
            self.connected = True
            self.births += 1
            spooled = list(self._spool)
            self._spool.clear()
        for ev in spooled:
            self._ddata(ev, historical=True)
            self.replayed += 1
        log.info("sparkplug: NBIRTH bdSeq %d, %d DBIRTH(s), %d spooled verdict(s) replayed", self.bdseq,
                 len(self.cameras), len(spooled))  # fmt: skip

    def _verdict(self, ev: VerdictEvent) -> None:
        self._last[ev.camera] = ev
        with self._lock:
            if not self.connected:
                if self.scfg.spool_max == 0:
                    self.dropped_spool += 1
                    return
                if len(self._spool) >= self.scfg.spool_max:
                    self._spool.popleft()
                    self.dropped_spool += 1
                self._spool.append(ev)
                return
        self._ddata(ev)

    def _ddata(self, ev: VerdictEvent, historical: bool = False) -> None:
        p = self.pb.Payload()
        p.timestamp = int(time.time() * 1000)
        self._result_metrics(p, ev, historical)
        with self._lock:
            if not self.connected:  # lost on the way: back to the spool, replayed after the next birth
                self._spool.appendleft(ev)
                return
            p.seq = self._take_seq()
            if not self._publish(self.topic("DDATA", ev.camera), p):
                self._spool.appendleft(ev)

    def _ndata(self) -> None:
        p = self.pb.Payload()
        p.timestamp = int(time.time() * 1000)
        self._node_metrics(p, birth=False)
        with self._lock:
            if not self.connected:
                return
            p.seq = self._take_seq()
            self._publish(self.topic("NDATA"), p)

    def stats(self) -> dict[str, Any]:
        """``outputs.sparkplug`` in the stats document."""
        return {"state": "up" if self.connected else "down", "bdseq": self.bdseq, "births": self.births,
                "sent": self.sent, "spooled": len(self._spool), "replayed": self.replayed,
                "dropped_queue": self.dropped_queue, "dropped_spool": self.dropped_spool,
                "rebirths": self.rebirths}  # fmt: skip
