"""OPC UA server (``rdedge[opcua]``) shaped after OPC 40100 (OPC UA for Machine Vision); docs/opcua.md.

Address space (namespace ``opcua.namespace``)::

    Objects/VisionSystem                      (EventNotifier: ResultReady events come from here)
        SystemState        String   Preoperational | Operational | Error | Halted (OPC 40100 VisionStateMachine)
        ModelId            String
        Counters/          FramesScored, FramesNg, FrameErrors, TriggerErrors, EventsDropped  (UInt64)
        Cameras/<camera>/  State (String: up/down/...), Result/ {Verdict, IsNg, Score, Threshold, Seq, FrameSeq,
                           ModelId, TriggerId, Time}
        Trigger(Camera: String, TriggerId: String) -> Accepted: Boolean
        SelectRecipe(Name: String) -> Status: String    (hot swap through the station's swapper, rdedge[ui])
    Types/EventTypes/BaseEventType/ResultReadyEventType
        Camera, Verdict, IsNg, Score, Threshold, Seq, FrameSeq, ModelId, TriggerId, ResultTime

Threads: asyncua's server runs on its own asyncio loop thread. :meth:`OpcUaOutput.on_verdict` (scoring thread)
only appends to a bounded deque (overflow drops the oldest, counted in ``EventsDropped``) and wakes the loop; the
loop writes the variables and fires the event. Security: user name / password (passwords from env or systemd
credentials), anonymous only when ``allow_anonymous``; policies None and Basic256Sha256 (Sign, SignAndEncrypt) with
the server's own certificate, made on first start in ``cert_dir`` if absent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.config import RuntimeConfig
from runtime.errors import ConfigError, MissingExtraError, RdedgeError
from runtime.outputs import Output, VerdictEvent

if TYPE_CHECKING:
    from runtime.service import Service

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
QUEUE_MAX = 256
STATE_PERIOD_S = 0.5
CERT_NAME = "server_cert.der"
KEY_NAME = "server_key.pem"

RESULT_FIELDS = ("Verdict", "IsNg", "Score", "Threshold", "Seq", "FrameSeq", "ModelId", "TriggerId", "Time")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class OpcUaOutput(Output):
    """The OPC UA server of one service.

    Args:
        cfg: the runtime config (its ``opcua`` section and cameras).

    Raises:
        MissingExtraError: asyncua (``rdedge[opcua]``) is not installed.
        ConfigError: a configured user has no password in its environment variable / credential file.
    """

    name = "opcua"

    def __init__(self, cfg: RuntimeConfig) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise MissingExtraError("asyncua", "opcua", "OPC UA server") from None
        self.ocfg = ocfg = cfg.opcua
        self.cameras = [c.name for c in cfg.cameras]
        self._passwords: dict[str, str] = {}
        for i, user in enumerate(ocfg.users):
            pw = user.resolve_password()
            if not pw:
                where = (
                    f"${user.password_env}"
                    if user.password_env
                    else f"$CREDENTIALS_DIRECTORY/{user.password_credential}"
                )
                raise ConfigError(f"opcua.users.{i}: no password for user {user.name!r} ({where} is not set)")
            self._passwords[user.name] = pw
        self.endpoint = f"opc.tcp://{ocfg.host}:{ocfg.port}/rdedge/"
        self.service: Service | None = None
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self.events_sent = 0
        self.events_dropped = 0
        self.trigger_errors = 0
        self.refused_logins = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._up = False

    # -- life cycle --------------------------------------------------------------------------------------------------

    def start(self, service: Service) -> None:
        """Make the certificate if absent, build the address space and serve; raises :class:`RdedgeError` if not."""
        self.service = service
        self._thread = threading.Thread(target=self._thread_main, name="opcua", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise RdedgeError(f"opcua: server on {self.endpoint} did not start within {START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            raise RdedgeError(f"opcua: cannot serve on {self.endpoint}: {self._start_error}")
        log.info("opcua: serving %s (anonymous %s, users %s)", self.endpoint,
                 "on" if self.ocfg.allow_anonymous else "off", ", ".join(self._passwords) or "none")  # fmt: skip

    def close(self) -> None:
        """Publish what is queued, then stop the server (SystemState Halted first)."""
        self._stopping = True
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("opcua: stopped (%d event(s) sent)", self.events_sent)

    def _kick(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("opcua: server failed")
        finally:
            self._up = False

    # -- the server (its own loop) -----------------------------------------------------------------------------------

    async def _make_cert(self) -> tuple[Path, Path]:
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        d = self.ocfg.cert_dir
        d.mkdir(parents=True, exist_ok=True)
        cert, key = d / CERT_NAME, d / KEY_NAME
        made = not cert.is_file() or not key.is_file()
        await setup_self_signed_certificate(key, cert, self.app_uri, socket.gethostname(),
                                            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                            {"commonName": f"rdedge@{socket.gethostname()}",
                                             "organizationName": "rdedge"})  # fmt: skip
        key.chmod(0o600)
        if made:
            log.info("opcua: made the server certificate %s (key %s)", cert, key)
        return cert, key

    @property
    def app_uri(self) -> str:
        return f"urn:{socket.gethostname()}:rdedge"

    async def _main(self) -> None:
        from asyncua import Server, ua
        from asyncua.common.methods import uamethod
        from asyncua.crypto.permission_rules import User, UserRole

        outer = self

        class _Users:
            def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                         certificate: Any = None) -> User | None:  # fmt: skip
                if username is None:
                    return User(role=UserRole.User) if outer.ocfg.allow_anonymous else None
                want = outer._passwords.get(username)
                if want is not None and password is not None and hmac.compare_digest(want.encode(), password.encode()):
                    return User(role=UserRole.User, name=username)
                outer.refused_logins += 1
                log.warning("opcua: login refused for user %r", username)
                return None

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        server = Server(user_manager=_Users())  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("rdedge")
        await server.set_application_uri(self.app_uri)
        cert, key = await self._make_cert()
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies = {
            "none": ua.SecurityPolicyType.NoSecurity,
            "basic256sha256_sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
            "basic256sha256_sign_encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        }
        server.set_security_policy([policies[p] for p in self.ocfg.security])
        tokens: list[type] = [ua.UserNameIdentityToken]
        if self.ocfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)

        idx = await server.register_namespace(self.ocfg.namespace)
        V = ua.VariantType
        etype = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [("Camera", V.String), ("Verdict", V.String), ("IsNg", V.Boolean), ("Score", V.Double),
             ("Threshold", V.Double), ("Seq", V.UInt64), ("FrameSeq", V.UInt64), ("ModelId", V.String),
             ("TriggerId", V.String), ("ResultTime", V.DateTime)],
        )  # fmt: skip
        vs = await server.nodes.objects.add_object(idx, "VisionSystem")
        await vs.write_attribute(ua.AttributeIds.EventNotifier,
                                 ua.DataValue(ua.Variant(1, V.Byte)))  # SubscribeToEvents # fmt: skip
        svc = self.service
        model_id = svc.model.model_id if svc is not None and svc.model is not None else ""
        state_var = await vs.add_variable(idx, "SystemState", "Preoperational", V.String)
        model_var = await vs.add_variable(idx, "ModelId", model_id, V.String)
        counters = await vs.add_folder(idx, "Counters")
        cvars = {n: await counters.add_variable(idx, n, 0, V.UInt64)
                 for n in ("FramesScored", "FramesNg", "FrameErrors", "TriggerErrors", "EventsDropped")}  # fmt: skip
        cams_folder = await vs.add_folder(idx, "Cameras")
        cam_state: dict[str, Any] = {}
        results: dict[str, dict[str, Any]] = {}
        defaults = {"Verdict": ("", V.String), "IsNg": (False, V.Boolean), "Score": (0.0, V.Double),
                    "Threshold": (0.0, V.Double), "Seq": (0, V.UInt64), "FrameSeq": (0, V.UInt64),
                    "ModelId": ("", V.String), "TriggerId": ("", V.String),
                    "Time": (_utc(0), V.DateTime)}  # fmt: skip
        for cam in self.cameras:
            cobj = await cams_folder.add_object(idx, cam)
            cam_state[cam] = await cobj.add_variable(idx, "State", "starting", V.String)
            robj = await cobj.add_object(idx, "Result")
            results[cam] = {f: await robj.add_variable(idx, f, *defaults[f]) for f in RESULT_FIELDS}

        @uamethod
        def trigger(_parent: Any, camera: str, trigger_id: str) -> bool:
            if svc is None or camera not in svc.cams or svc.cams[camera].cfg.mode != "triggered":
                return False
            svc.trigger(camera, trigger_id)
            return True

        @uamethod
        def select_recipe(_parent: Any, name: str) -> str:
            return self._select_recipe(name)

        await vs.add_method(idx, "Trigger", trigger, [V.String, V.String], [V.Boolean])
        await vs.add_method(idx, "SelectRecipe", select_recipe, [V.String], [V.String])
        gen = await server.get_event_generator(etype, vs.nodeid)

        async with server:
            self._up = True
            self._started.set()
            last_state = 0.0
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), STATE_PERIOD_S)
                self._wake.clear()
                while self._queue:
                    kind, item = self._queue.popleft()
                    try:
                        if kind == "verdict":
                            await self._publish(item, results[item.camera], gen, model_var)
                    except Exception:  # one bad update must not take the server down
                        log.exception("opcua: cannot publish %s", kind)
                now = time.monotonic()
                if now - last_state >= STATE_PERIOD_S or self._stopping:
                    last_state = now
                    await self._write_state(state_var, cvars, cam_state)
                if self._stopping:
                    await state_var.write_value("Halted")
                    break

    async def _publish(self, ev: VerdictEvent, rvars: dict[str, Any], gen: Any, model_var: Any) -> None:
        from asyncua import ua

        V = ua.VariantType
        verdict = "NG" if ev.is_ng else "OK"
        tid = "" if ev.trigger_id is None else str(ev.trigger_id)
        values = {"Verdict": (verdict, V.String), "IsNg": (ev.is_ng, V.Boolean), "Score": (ev.score, V.Double),
                  "Threshold": (ev.threshold, V.Double), "Seq": (ev.seq, V.UInt64),
                  "FrameSeq": (ev.frame_seq, V.UInt64), "ModelId": (ev.model_id, V.String),
                  "TriggerId": (tid, V.String), "Time": (_utc(ev.ts), V.DateTime)}  # fmt: skip
        for f, (val, vt) in values.items():
            await rvars[f].write_value(ua.Variant(val, vt))
        await model_var.write_value(ev.model_id)
        e = gen.event
        e.Camera, e.Verdict, e.IsNg, e.Score, e.Threshold = ev.camera, verdict, ev.is_ng, ev.score, ev.threshold
        e.Seq, e.FrameSeq, e.ModelId, e.TriggerId, e.ResultTime = ev.seq, ev.frame_seq, ev.model_id, tid, _utc(ev.ts)
        e.Severity = 700 if ev.is_ng else 100
        await gen.trigger(time_attr=_utc(ev.ts), message=f"{ev.camera} seq {ev.seq}: {verdict} score {ev.score:.6g}")
        self.events_sent += 1

    async def _write_state(self, state_var: Any, cvars: dict[str, Any], cam_state: dict[str, Any]) -> None:
        svc = self.service
        if svc is None:
            return
        states = {n: st.grabber.state for n, st in svc.cams.items()}
        for n, var in cam_state.items():
            await var.write_value(states.get(n, "unknown"))
        if self._stopping or svc.stop.is_set():
            system = "Halted"
        elif any(s == "down" for s in states.values()):
            system = "Error"
        else:
            system = "Operational"
        await state_var.write_value(system)
        from asyncua import ua

        for n, val in (("FramesScored", svc.frames_scored), ("FramesNg", svc.frames_ng),
                       ("FrameErrors", svc.frame_errors), ("TriggerErrors", self.trigger_errors),
                       ("EventsDropped", self.events_dropped)):  # fmt: skip
            await cvars[n].write_value(ua.Variant(val, ua.VariantType.UInt64))

    def _select_recipe(self, name: str) -> str:
        svc = self.service
        swapper = next((getattr(o, "swapper", None) for o in (svc.outputs if svc else []) if o.name == "station"), None)
        if swapper is None:
            return "refused: recipe selection needs the station (ui.enabled) and its bundles_dir"
        try:
            swapper.swap(swapper.resolve(name), user="opcua")
        except Exception as exc:  # unknown bundle, a swap already running
            return f"refused: {exc}"
        return f"swapping to {name}"

    # -- from the service (scoring thread) ---------------------------------------------------------------------------

    def on_verdict(self, event: VerdictEvent) -> None:
        """Queue the verdict for the server loop (bounded: the oldest is dropped and counted)."""
        if len(self._queue) >= QUEUE_MAX:
            with contextlib.suppress(IndexError):
                self._queue.popleft()
                self.events_dropped += 1
        self._queue.append(("verdict", event))
        self._kick()

    def on_trigger_error(self, camera: str, trigger_id: str | int, error: str) -> None:
        """Counted in Counters/TriggerErrors (the MQTT error topic carries the reason)."""
        self.trigger_errors += 1

    def stats(self) -> dict[str, Any]:
        """``outputs.opcua`` in the stats document."""
        return {"state": "up" if self._up else "down", "endpoint": self.endpoint, "events": self.events_sent,
                "events_dropped": self.events_dropped, "queued": len(self._queue),
                "refused_logins": self.refused_logins}  # fmt: skip
