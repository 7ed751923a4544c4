"""MQTT link to the PLC/SCADA: availability, spooled at-least-once verdicts, triggers. Contract: docs/mqtt.md.

paho-mqtt >= 2 (``CallbackAPIVersion.VERSION2``) speaking MQTT v5. One paho network thread (``loop_start``) plus one
*pump* thread that feeds the :class:`~runtime.spool.Spool` to the broker:

* Results, alerts and trigger error replies are committed to the spool first (:meth:`MqttLink.enqueue`); the pump
  hands them to paho in spool order while connected, keeping at most ``max_inflight`` unacknowledged; PUBACK
  (``on_publish``) deletes them from the spool, in batches. Nothing is handed over while offline, so an outage only
  grows the spool (bounded, oldest dropped and counted). Messages paho already holds when the link drops are resent
  by paho itself after reconnecting (DUP flag); after a process restart the pump starts at the oldest spooled row.
* ``<prefix>/<device>/status``: last will ``offline`` (retained), ``online`` (retained) published only from a
  *successful* CONNACK, ``stopped`` (retained) on a clean exit. Per-camera states are remembered and re-published
  (retained) after every reconnect.
* A refused CONNACK (bad password, not authorised, ...) is logged once per streak with the broker's reason, the link
  stays "not connected" and paho retries with its capped exponential backoff (1 s .. ``reconnect_max_s``).
* A failed connection attempt is named for what it is, once per streak: a TLS failure (wrong CA, hostname mismatch,
  expired certificate, handshake refused) from the ``ssl`` exception paho raised, else "unreachable" with the OS
  error. paho's per-attempt "Client is not connected" ERROR line is filtered out (it says nothing new).
* A refused *message* (PUBACK reason code >= 0x80, e.g. 135 Not authorized from the broker's ACL) is never treated
  as delivered: the pump moves it to the spool's dead-letter table (:meth:`Spool.dead_letter`), and the first
  refusal per topic and streak is logged as an ERROR naming the topic and the reason.
* Triggers: ``<prefix>/<device>/<camera>/trigger`` payloads are parsed here; a valid one goes to the service's
  callback, a malformed one gets an error reply on ``<prefix>/<device>/<camera>/error`` (and on the v5 response topic
  when the trigger named one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from runtime.config import MqttConfig
from runtime.health import LatencyTracker
from runtime.spool import OutMessage, Spool, SpoolItem

log = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 1024
"""Trigger payloads larger than this are rejected unparsed (a PLC sends ``{"id": ...}``, a few dozen bytes)."""
MAX_TRIGGER_ID_LEN = 128
_SETTLE_AFTER_CONNECT_S = 0.1  # let paho resend what it held before the pump sends newer rows (keeps order)


class Topics:
    """Topic names under ``<prefix>/<device>``."""

    def __init__(self, prefix: str, device: str) -> None:
        self.base = f"{prefix.strip('/')}/{device}"
        self.status = f"{self.base}/status"
        self.stats = f"{self.base}/stats"

    def camera_status(self, camera: str) -> str:
        return f"{self.base}/{camera}/status"

    def result(self, camera: str) -> str:
        return f"{self.base}/{camera}/result"

    def alert(self, camera: str) -> str:
        return f"{self.base}/{camera}/alert"

    def alert_image(self, camera: str) -> str:
        return f"{self.base}/{camera}/alert/image"

    def trigger(self, camera: str) -> str:
        return f"{self.base}/{camera}/trigger"

    def error(self, camera: str) -> str:
        return f"{self.base}/{camera}/error"


class TriggerError(ValueError):
    """A trigger payload that cannot be served; the message says why (it goes into the error reply)."""


@dataclass(frozen=True)
class TriggerRequest:
    """A valid trigger: camera, the PLC's id, MQTT v5 response topic / correlation data, arrival (monotonic s)."""

    camera: str
    id: str | int
    response_topic: str | None
    correlation: bytes | None
    received: float


def parse_trigger(payload: bytes) -> str | int:
    """Validate a trigger payload ``{"id": <str|int>}`` and return the id.

    Raises:
        TriggerError: too large, not UTF-8 JSON, not an object, nesting too deep, id missing / empty / too long /
            of another type (booleans and floats are refused: a PLC id is an integer or a string).
    """
    if len(payload) > MAX_TRIGGER_BYTES:
        raise TriggerError(f"payload too large ({len(payload)} bytes > {MAX_TRIGGER_BYTES})")
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise TriggerError("payload is not UTF-8 text") from None
    except RecursionError:
        raise TriggerError("JSON nested too deeply") from None
    except ValueError as exc:
        raise TriggerError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TriggerError(f'payload must be a JSON object like {{"id": 17}}, got {type(data).__name__}')
    if "id" not in data:
        raise TriggerError('payload has no "id"')
    tid = data["id"]
    if isinstance(tid, bool) or not isinstance(tid, (str, int)):
        raise TriggerError(f'"id" must be a string or an integer, got {type(tid).__name__}')
    if isinstance(tid, str) and not (0 < len(tid) <= MAX_TRIGGER_ID_LEN):
        raise TriggerError(f'"id" string must have 1..{MAX_TRIGGER_ID_LEN} characters')
    if isinstance(tid, int) and not (-(2**63) <= tid < 2**63):
        raise TriggerError('"id" integer out of the 64-bit range')
    return tid


class _DropNotConnectedNoise(logging.Filter):
    """Drops paho's "Client is not connected" ERROR, which it logs on every failed reconnect attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("runtime.mqtt.paho")
_PAHO_LOG.addFilter(_DropNotConnectedNoise())

# OpenSSL X509_V_ERR_* codes worth a plain-words hint (ssl.SSLCertVerificationError.verify_code)
_TLS_VERIFY_HINTS = {
    2: "the broker's certificate chain does not lead to mqtt.tls.ca_file (wrong CA?)",
    9: "the broker's certificate is not valid yet (check the device clock)",
    10: "the broker's certificate has expired (renew it, or check the device clock)",
    18: "the broker's certificate is self-signed and not mqtt.tls.ca_file (wrong CA?)",
    19: "the broker's chain has a self-signed CA other than mqtt.tls.ca_file (wrong CA?)",
    20: "the broker's certificate was not issued by mqtt.tls.ca_file (wrong CA?)",
    21: "the broker's certificate was not issued by mqtt.tls.ca_file (wrong CA?)",
    62: "the broker's certificate does not name mqtt.host (hostname mismatch)",
    64: "the broker's certificate does not name the address in mqtt.host (IP address mismatch)",
}


def describe_connect_error(exc: BaseException | None) -> tuple[str, str]:
    """Classify a failed connection attempt from the exception paho raised.

    Returns:
        ``(kind, text)``: kind is ``"tls"`` (certificate verification or handshake) or ``"unreachable"`` (refused,
        timed out, no route, DNS, or no exception known); text names the cause in plain words.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        message = getattr(exc, "verify_message", None) or str(exc)
        hint = _TLS_VERIFY_HINTS.get(code) if isinstance(code, int) else None
        return "tls", f"TLS certificate verification failed: {message}" + (f" -- {hint}" if hint else "")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or str(exc)
        return "tls", f"TLS handshake failed: {reason} (is the client certificate accepted, the port a TLS port?)"
    if exc is None:
        return "unreachable", "unreachable"
    return "unreachable", f"unreachable: {exc}"


def _reason_text(rc: ReasonCode | MQTTErrorCode | int) -> str:
    if isinstance(rc, ReasonCode):
        return f"{rc.getName()} (reason code {rc.value})"
    if isinstance(rc, MQTTErrorCode):
        return paho.error_string(rc)
    return str(rc)


class MqttLink:
    """The broker connection, the spool pump and the trigger subscription.

    Args:
        cfg: broker and topic settings.
        spool: the outbox every at-least-once message goes through.
        cameras: camera names (for per-camera status).
        triggered: cameras in triggered mode (their trigger topics are subscribed).
        on_trigger: called (paho thread, keep it short) with each valid trigger.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        spool: Spool,
        cameras: Sequence[str] = (),
        triggered: Sequence[str] = (),
        on_trigger: Callable[[TriggerRequest], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.topics = Topics(cfg.topic_prefix, cfg.device_id)
        self.cameras = list(cameras)
        self.triggered = list(triggered)
        self.on_trigger = on_trigger
        self.client_id = cfg.client_id or f"rdedge-{cfg.device_id}"

        # counters (read by stats)
        self.reconnects = 0  # successful connects after the first one
        self.refusals = 0  # refused CONNACKs
        self.sent = 0
        self.acked = 0
        self.rejected = 0  # PUBACK with a failure reason: moved to the spool's dead-letter table
        self.bad_triggers = 0
        self.skipped_offline = 0  # volatile messages (stats, images) not sent because offline
        self.ack_latency = LatencyTracker()  # "spool_to_ack": spool commit -> PUBACK, ms (includes outages)

        self._connected = threading.Event()
        self._ever_connected = False
        self._connected_at = 0.0
        self._refused_reason: str | None = None
        self._unreachable_logged = False
        self._connect_error: str | None = None  # the failure logged for the current streak of failed attempts
        self.refused_topics: dict[str, str] = {}  # topic -> broker reason, for the current streak per topic
        self._probe_at: dict[str, float] = {}  # refused topic -> monotonic time its next message may be sent
        self._last_refusal = -math.inf
        self._refusal_disconnect_logged = False
        self._camera_state: dict[str, str] = {}

        self._lock = threading.Lock()  # guards the maps below; never held while calling paho
        self._inflight: dict[int, tuple[int, float, str]] = {}  # paho mid -> (spool id, spool write time, topic)
        # mids acknowledged before publish() returned -> (monotonic time, failure reason or None)
        self._early: dict[int, tuple[float, str | None]] = {}
        self._acked_ids: list[int] = []
        self._refused_ids: list[tuple[int, str]] = []  # (spool id, reason) to move to the dead-letter table
        self._cursor = 0  # highest spool id handed to paho
        self._wake = threading.Condition()
        self._new = True
        self._stop = threading.Event()
        self._pump_thread: threading.Thread | None = None

        self.client = self._make_client()

    # -- setup -----------------------------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        c.enable_logger(_PAHO_LOG)
        _PAHO_LOG.setLevel(logging.WARNING)
        c.will_set(self.topics.status, "offline", qos=1, retain=True)
        if self.cfg.username is not None:
            password = self.cfg.resolve_password()
            if password is None:
                log.warning("mqtt.username is set but no password was found ($CREDENTIALS_DIRECTORY/%s, $%s); "
                            "connecting without one", self.cfg.password_credential, self.cfg.password_env)  # fmt: skip
            c.username_pw_set(self.cfg.username, password)
        tls = self.cfg.tls
        if tls is not None:
            c.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            c.tls_insecure_set(tls.insecure)
            if tls.insecure:
                log.warning("mqtt.tls.insecure is true: the broker's certificate is NOT checked against mqtt.host "
                            "%r; any certificate from that CA is accepted (test rigs only)", self.cfg.host)  # fmt: skip
        c.reconnect_delay_set(min_delay=1, max_delay=max(1, math.ceil(self.cfg.reconnect_max_s)))
        c.max_inflight_messages_set(self.cfg.max_inflight)
        c.max_queued_messages_set(0)
        c.on_socket_open = _no_delay
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    def start(self) -> None:
        """Connect in the background (retrying forever) and start the spool pump."""
        log.info("MQTT: connecting to %s:%d as %s%s (topics %s/...)", self.cfg.host, self.cfg.port, self.client_id,
                 " with TLS" if self.cfg.tls else "", self.topics.base)  # fmt: skip
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, clean_start=True)
        self.client.loop_start()
        self._pump_thread = threading.Thread(target=self._pump, name="mqtt-pump", daemon=True)
        self._pump_thread.start()

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    # -- paho callbacks (network thread) ---------------------------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, properties: Properties | None
    ) -> None:
        if rc.is_failure:
            self._connected.clear()
            self.refusals += 1
            reason = _reason_text(rc)
            if reason != self._refused_reason:
                hint = ""
                if rc.value in (134, 135, 4, 5):  # bad user name or password / not authorised (v5 and v3 codes)
                    hint = " -- check mqtt.username and the password (env / $CREDENTIALS_DIRECTORY)"
                log.error("MQTT broker %s:%d refused the connection: %s%s; retrying with backoff up to %d s "
                          "(results are spooled meanwhile)", self.cfg.host, self.cfg.port, reason, hint,
                          max(1, math.ceil(self.cfg.reconnect_max_s)))  # fmt: skip
                self._refused_reason = reason
            else:
                log.debug("MQTT connection refused again: %s", reason)
            return
        if self._refused_reason is not None or self._unreachable_logged:
            log.info("MQTT broker %s:%d accepted the connection again", self.cfg.host, self.cfg.port)
        self._refused_reason = None
        self._unreachable_logged = False
        self._connect_error = None
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._connected_at = time.monotonic()
        client.publish(self.topics.status, "online", qos=1, retain=True)
        for cam, state in list(self._camera_state.items()):
            client.publish(self.topics.camera_status(cam), state, qos=1, retain=True)
        for cam in self.triggered:
            client.subscribe(self.topics.trigger(cam), qos=1)
        self._connected.set()
        log.info("MQTT connected to %s:%d (spool depth %d)", self.cfg.host, self.cfg.port, self.spool.depth)
        self._notify()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` around reconnect(): the exception is still current
        kind, text = describe_connect_error(sys.exc_info()[1])
        if text == self._connect_error:
            log.debug("MQTT connection attempt failed again: %s", text)
            return
        self._connect_error = text
        self._unreachable_logged = True
        level = logging.ERROR if kind == "tls" else logging.WARNING
        log.log(level, "MQTT broker %s:%d %s; retrying with backoff up to %d s (results are spooled)",
                self.cfg.host, self.cfg.port, text, max(1, math.ceil(self.cfg.reconnect_max_s)))  # fmt: skip

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, properties: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            self._connect_error = None
            if time.monotonic() - self._last_refusal < 2.0:
                # mosquitto 2.0.11 (Debian 12 / Ubuntu 22.04) closes the connection right after a refusing PUBACK
                if not self._refusal_disconnect_logged:
                    log.warning("MQTT broker closed the connection after refusing a message (%s); reconnecting. "
                                "Messages on refused topics are held back meanwhile (one probe every %g s)",
                                _reason_text(rc), self.cfg.refused_probe_s)  # fmt: skip
                    self._refusal_disconnect_logged = True
                return
            log.warning("MQTT disconnected: %s; spooling until reconnected (depth %d)", _reason_text(rc),
                        self.spool.depth)  # fmt: skip
            self._unreachable_logged = True

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, properties: Properties | None
    ) -> None:
        reason = _reason_text(rc) if rc.is_failure else None
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:  # acknowledged before publish() returned: _hand_over settles it
                self._early[mid] = (time.monotonic(), reason)
                return
        self._settle_one(*entry, reason)
        self._notify()

    def _settle_one(self, sid: int, created: float, topic: str, reason: str | None) -> None:
        """Book one broker answer: ``reason`` None = delivered (delete), else refused (dead-letter, log once)."""
        with self._lock:
            if reason is not None:
                self.rejected += 1
                self._refused_ids.append((sid, reason))
                first = self.refused_topics.get(topic) != reason
                self.refused_topics[topic] = reason
                self._last_refusal = time.monotonic()
                self._probe_at[topic] = self._last_refusal + self.cfg.refused_probe_s
                again = False
            else:
                self.ack_latency.record({"spool_to_ack": (time.time() - created) * 1e3})
                self._acked_ids.append(sid)
                first = False
                again = self.refused_topics.pop(topic, None) is not None
                self._probe_at.pop(topic, None)
                if not self.refused_topics:
                    self._refusal_disconnect_logged = False
        if first:
            log.error("MQTT broker %s:%d REFUSES messages on %s: %s -- they are kept in the spool's dead-letter "
                      "table (%s); fix the broker's ACL for this device, then run 'rdedge spool replay-dead "
                      "--config CFG'", self.cfg.host, self.cfg.port, topic, reason, self.spool.path)  # fmt: skip
        elif again:
            log.info("MQTT broker accepts messages on %s again", topic)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        camera = next((c for c in self.triggered if msg.topic == self.topics.trigger(c)), None)
        if camera is None:
            return
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if response_topic is not None and not isinstance(response_topic, str):
            response_topic = None
        if response_topic and any(ch in response_topic for ch in "+#"):
            response_topic = None  # wildcards are not valid publish topics
        try:
            tid = parse_trigger(bytes(msg.payload))
        except TriggerError as exc:
            self.bad_triggers += 1
            log.warning("camera %s: bad trigger (%d bytes): %s", camera, len(msg.payload), exc)
            self.publish_error(camera, str(exc), None, response_topic, correlation)
            return
        req = TriggerRequest(camera, tid, response_topic, correlation, time.monotonic())
        if self.on_trigger is not None:
            self.on_trigger(req)

    # -- publishing ------------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._wake:
            self._new = True
            self._wake.notify()

    def enqueue(self, build: Callable[[int], Sequence[OutMessage]]) -> tuple[int, list[SpoolItem]]:
        """Spool messages under a freshly allocated seq (see :meth:`Spool.add`) and wake the pump."""
        seq, items = self.spool.add(build)
        self._notify()
        return seq, items

    def enqueue_plain(self, messages: Sequence[OutMessage]) -> list[SpoolItem]:
        """Spool messages without a seq and wake the pump."""
        items = self.spool.put(messages)
        self._notify()
        return items

    def publish_error(
        self,
        camera: str,
        error: str,
        trigger_id: str | int | None,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        """Spool an error reply on ``<camera>/error`` (and on the response topic when given)."""
        body = json.dumps(
            {
                "device": self.cfg.device_id,
                "camera": camera,
                "ts": round(time.time(), 6),
                "error": error,
                "id": trigger_id,
            },  # fmt: skip
            separators=(",", ":"),
        ).encode()
        msgs = [OutMessage(self.topics.error(camera), body, qos=self.cfg.qos)]
        if response_topic:
            msgs.append(OutMessage(response_topic, body, qos=self.cfg.qos, correlation=correlation))
        self.enqueue_plain(msgs)

    def publish_volatile(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Publish state that is not spooled (stats, overlay images): sent when connected, else counted and skipped."""
        if not self.connected:
            self.skipped_offline += 1
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def set_camera_status(self, camera: str, state: str) -> None:
        """Remember a camera's state and publish it retained (again after every reconnect)."""
        if self._camera_state.get(camera) == state:
            return
        self._camera_state[camera] = state
        if self.connected:
            self.client.publish(self.topics.camera_status(camera), state, qos=1, retain=True)

    @property
    def inflight(self) -> int:
        """Spooled messages handed to paho and not yet acknowledged."""
        return len(self._inflight)

    def _pump(self) -> None:
        while True:
            with self._wake:
                if not self._new:
                    self._wake.wait(0.5)
                self._new = False
            with self._lock:
                acked, self._acked_ids = self._acked_ids, []
                refused, self._refused_ids = self._refused_ids, []
                now = time.monotonic()
                for mid in [m for m, (t, _r) in self._early.items() if now - t > 10.0]:
                    del self._early[mid]
            self._settle(acked, refused)
            if self._stop.is_set():
                return
            if not self.connected:
                continue
            settle = _SETTLE_AFTER_CONNECT_S - (time.monotonic() - self._connected_at)
            if settle > 0:
                time.sleep(settle)
            room = self.cfg.max_inflight - len(self._inflight)
            if room <= 0:
                continue
            held: list[tuple[int, str]] = []
            for item in self.spool.pending(after_id=self._cursor, limit=room):
                if self._hold_back(item, held):
                    continue
                if not self._hand_over(item):
                    break
            if held:
                self._settle([], held)

    def _hold_back(self, item: SpoolItem, held: list[tuple[int, str]]) -> bool:
        """Whether ``item`` goes straight to the dead-letter table because the broker refuses its topic.

        While a topic is refused, only one message per ``refused_probe_s`` is sent to ask the broker again (some
        brokers drop the connection after every refusal: sending each would starve every other topic); the rest
        are dead-lettered with the broker's last reason. The first accepted probe ends the hold.
        """
        with self._lock:
            reason = self.refused_topics.get(item.topic)
            if reason is None:
                return False
            now = time.monotonic()
            if now >= self._probe_at.get(item.topic, 0.0):
                self._probe_at[item.topic] = now + self.cfg.refused_probe_s
                return False  # this one is the probe
            self._cursor = max(self._cursor, item.id)
        held.append((item.id, f"{reason}; held back, not sent (topic refused)"))
        return True

    def _settle(self, acked: list[int], refused: list[tuple[int, str]]) -> None:
        """Delete acknowledged rows and dead-letter refused ones; on a spool error keep them for the next round."""
        try:
            if acked:
                self.acked += self.spool.ack(acked)
                acked = []
            if refused:
                self.spool.dead_letter(refused)
                refused = []
        except sqlite3.Error as exc:  # e.g. disk full: the pump must survive; rows stay, at worst sent twice
            log.error("spool: cannot record %d acknowledgement(s) / %d refusal(s): %s", len(acked), len(refused), exc)
            with self._lock:
                self._acked_ids[:0] = acked
                self._refused_ids[:0] = refused
            time.sleep(0.5)

    def _hand_over(self, item: SpoolItem) -> bool:
        props = None
        if item.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = item.correlation
        info = self.client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain, properties=props)
        # QoS>0: paho keeps the message (and resends it after a reconnect) even when it answers NO_CONN
        held = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (item.qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN)
        if not held:
            log.debug("publish of spooled message %d deferred: %s", item.id, paho.error_string(info.rc))
            return False
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = (item.id, item.created, item.topic)
            self._cursor = max(self._cursor, item.id)
        if early is not None:
            self._settle_one(item.id, item.created, item.topic, early[1])
        self.sent += 1
        return True

    # -- shutdown --------------------------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is empty (every message acknowledged) or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        self.spool.refresh()
        while time.monotonic() < deadline:
            if self.spool.depth == 0:
                return True
            if not self.connected:
                break
            self._notify()
            time.sleep(0.02)
        return self.spool.depth == 0

    def close(self, flush_s: float = 2.0, publish_stopped: bool = True) -> None:
        """Clean exit: flush the spool (up to ``flush_s``), publish retained ``stopped``, disconnect."""
        flushed = self.flush(flush_s)
        if not flushed:
            log.warning("MQTT: %d message(s) still spooled at exit; they are sent after the next start",
                        self.spool.depth)  # fmt: skip
        self._stop.set()
        if publish_stopped and self.connected:
            info = self.client.publish(self.topics.status, "stopped", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except (RuntimeError, ValueError) as exc:
                log.debug("'stopped' not confirmed: %s", exc)
        self._notify()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=2)
        # paho's network thread logs a spurious "Client is not connected" error while winding down
        _PAHO_LOG.setLevel(logging.CRITICAL)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        with self._lock:
            acked, self._acked_ids = self._acked_ids, []
            refused, self._refused_ids = self._refused_ids, []
        try:
            self.acked += self.spool.ack(acked)
            self.spool.dead_letter(refused)
        except sqlite3.Error as exc:
            log.error("spool: cannot record the last acknowledgements at exit: %s (sent again next start)", exc)


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Turn Nagle off on the broker socket: verdicts and trigger replies are small packets, and Nagle's algorithm
    with the broker's delayed ACK held each trigger round trip ~80 ms longer (91 -> 10 ms p50 measured in
    ``benchmarks/line_roundtrip.py`` with TCP_NODELAY on both hops)."""
    # not a TCP socket (unix socket, websocket wrapper): nothing to tune
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
