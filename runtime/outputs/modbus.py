"""Modbus TCP server for the PLC (``rdedge[modbus]``): register map v1 and the trigger / result handshake.

The map and the handshake are documented for the PLC programmer in docs/modbus.md; the constants below are the
single source of both. One map serves one triggered camera (``modbus.camera``).

Threads: pymodbus runs its asyncio server on a thread of its own (the heartbeat task too). The state the PLC reads
lives in :class:`_State` under a lock; pymodbus' register block is refreshed from it by the access hook on every
request, so a read always sees one consistent result (no torn score/seq pair). The scoring thread only calls
:meth:`ModbusOutput.on_verdict`, which copies a few numbers under that lock -- microseconds, never blocking scoring.

Handshake (the one LandingEdge and Cognex document): the PLC raises TRIGGER (control bit 0) while TRIGGER_READY is
set; rdedge drops TRIGGER_READY, queues the trigger on the service's trigger path (the next frame grabbed after it is
scored), writes the result registers and raises RESULT_READY; the PLC reads the result and raises RESULT_ACK
(control bit 1); rdedge drops RESULT_READY and raises TRIGGER_READY again. A trigger that gets no verdict (no fresh
frame in ``no_frame_timeout_s``, unscorable frame) still completes the handshake with verdict ERROR and an error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.config import RuntimeConfig
from runtime.errors import MissingExtraError, RdedgeError
from runtime.outputs import Output, VerdictEvent

if TYPE_CHECKING:
    from runtime.service import Service

log = logging.getLogger(__name__)

MAP_VERSION = 1
START_TIMEOUT_S = 10.0

# -- status block: holding registers 0..STATUS_LEN-1, read-only (writes answer exception 2, ILLEGAL ADDRESS) --------
REG_MAP_VERSION = 0  # MAP_VERSION
REG_HEARTBEAT = 1  # +1 every heartbeat_s, wraps at 65536
REG_STATE = 2  # STATE_*
REG_STATUS = 3  # STATUS_* bits
REG_VERDICT = 4  # VERDICT_* of the last result
REG_SCORE = 5  # int32 (2 registers, high word first): round(score * score_scale)
REG_THRESHOLD = 7  # int32: round(threshold * score_scale)
REG_SEQ = 9  # uint32: the verdict's seq (MQTT seq; local counter without a broker)
REG_TRIGGER_ID_ECHO = 11  # the TRIGGER_ID the PLC wrote for the trigger this result answers
REG_ERROR = 12  # ERR_* (last error; 0 after a successful result)
REG_RECIPE = 13  # active recipe: index of the running bundle in the station's bundles_dir (0xFFFF: none of them)
REG_RESULTS = 14  # uint32: results handed out through this map (OK + NG + ERROR)
REG_OK = 16  # uint32: OK verdicts of the camera
REG_NG = 18  # uint32: NG verdicts of the camera
REG_ERRORS = 20  # uint32: handshake / trigger errors
REG_SCALE = 22  # score_scale as uint32 (so the PLC can unscale)
STATUS_LEN = 24

# -- control block: holding registers written by the PLC ---------------------------------------------------------
REG_CONTROL = 100  # CTRL_* bits
REG_TRIGGER_ID = 101  # PLC's id for the next trigger (write it before raising TRIGGER); echoed in REG_TRIGGER_ID_ECHO
REG_RECIPE_SELECT = 102  # write N: hot-swap to recipe N (the station's bundles, sorted by folder name, from 0)
CONTROL_LEN = 3
NO_RECIPE = 0xFFFF

STATE_STARTING, STATE_READY, STATE_BUSY, STATE_RESULT, STATE_CAMERA_DOWN, STATE_STOPPING = 0, 1, 2, 3, 4, 5
STATUS_TRIGGER_READY, STATUS_RESULT_READY, STATUS_CAMERA_ONLINE, STATUS_NG, STATUS_ERROR = 1, 2, 4, 8, 16
STATUS_RECIPE_BUSY = 32  # a recipe change is loading / verifying
CTRL_TRIGGER, CTRL_RESULT_ACK = 1, 2
VERDICT_NONE, VERDICT_OK, VERDICT_NG, VERDICT_ERROR = 0, 1, 2, 3
(
    ERR_NONE,
    ERR_TRIGGER_NOT_READY,
    ERR_ACK_WITHOUT_RESULT,
    ERR_NO_FRAME,
    ERR_CANNOT_SCORE,
    ERR_REFUSED,
    ERR_RECIPE_REFUSED,
) = range(7)


def _u32(value: int) -> tuple[int, int]:
    value &= 0xFFFFFFFF
    return value >> 16, value & 0xFFFF


def _scaled(value: float, scale: float) -> int:
    """``round(value * scale)`` clamped to int32, as two's complement uint32."""
    return max(-(2**31), min(2**31 - 1, round(value * scale))) & 0xFFFFFFFF


def _error_code(why: str) -> int:
    if why.startswith("cannot score"):
        return ERR_CANNOT_SCORE
    if why.startswith("no fresh frame") or why == "camera ended":
        return ERR_NO_FRAME
    return ERR_REFUSED  # queue full, shutting down


@dataclass
class _State:
    """What the PLC sees; every field is guarded by :attr:`ModbusOutput._lock`."""

    heartbeat: int = 0
    running: bool = False
    stopping: bool = False
    trigger_ready: bool = True
    result_ready: bool = False
    busy: bool = False
    camera_online: bool = False
    verdict: int = VERDICT_NONE
    score: int = 0
    threshold: int = 0
    seq: int = 0
    trigger_id_echo: int = 0
    error: int = ERR_NONE
    results: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    control: int = 0  # last value written to REG_CONTROL (edge detection)
    trigger_id: int = 0  # last value written to REG_TRIGGER_ID
    pending: str | None = None  # the service trigger id this map waits for
    pending_plc_id: int = 0


class ModbusOutput(Output):
    """The Modbus TCP server of one service (register map v1, docs/modbus.md).

    Args:
        cfg: the runtime config (its ``modbus`` section and cameras).

    Raises:
        MissingExtraError: pymodbus (``rdedge[modbus]``) is not installed.
    """

    name = "modbus"

    def __init__(self, cfg: RuntimeConfig) -> None:
        try:
            import pymodbus  # noqa: F401
        except ImportError:
            raise MissingExtraError("pymodbus", "modbus", "Modbus TCP server") from None
        self.mcfg = mcfg = cfg.modbus
        self.camera = mcfg.camera or next(c.name for c in cfg.cameras if c.mode == "triggered")
        self.scale = mcfg.score_scale
        self._lock = threading.Lock()
        self._s = _State()
        self._n = 0  # triggers accepted (unique part of the service trigger id)
        self.clients = 0
        self.bad_requests = 0  # exception answers: out-of-range / read-only addresses (counted by the access hook)
        self.service: Service | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_async: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._recipe_cache: tuple[Any, int] = (None, NO_RECIPE)

    # -- life cycle --------------------------------------------------------------------------------------------------

    def start(self, service: Service) -> None:
        """Bind and serve on ``modbus.host:port``; raises :class:`RdedgeError` if the port cannot be bound."""
        self.service = service
        self._thread = threading.Thread(target=self._thread_main, name="modbus", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise RdedgeError(f"modbus: server on {self.mcfg.host}:{self.mcfg.port} did not start")
        if self._start_error is not None:
            raise RdedgeError(f"modbus: cannot serve on {self.mcfg.host}:{self.mcfg.port}: {self._start_error}")
        with self._lock:
            self._s.running = True
        log.info("modbus: register map v%d on %s:%d for camera %s", MAP_VERSION, self.mcfg.host, self.mcfg.port,
                 self.camera)  # fmt: skip

    def close(self) -> None:
        """Report STOPPING for a moment, then stop the server thread."""
        with self._lock:
            self._s.stopping = True
        loop, ev = self._loop, self._stop_async
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(ev.set)
        if self._thread is not None:
            self._thread.join(timeout=3)
        log.info("modbus: stopped")

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # pragma: no cover - reported through start()
            self._start_error = exc
            self._started.set()

    async def _main(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self._loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        device = SimDevice(
            id=0,  # every unit id
            simdata=[
                SimData(0, count=STATUS_LEN, values=0, datatype=DataType.REGISTERS, readonly=True),
                SimData(REG_CONTROL, count=CONTROL_LEN, values=0, datatype=DataType.REGISTERS),
            ],
            action=self._access,
        )
        server = ModbusTcpServer(device, address=(self.mcfg.host, self.mcfg.port), trace_connect=self._on_connect,
                                 trace_pdu=self._on_pdu)  # fmt: skip
        try:
            await server.serve_forever(background=True)
        except Exception as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._stop_async.wait()
        finally:
            beat.cancel()
            await server.shutdown()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.mcfg.heartbeat_s)
            with self._lock:
                self._s.heartbeat = (self._s.heartbeat + 1) & 0xFFFF

    def _on_connect(self, connected: bool) -> None:
        self.clients += 1 if connected else -1

    def _on_pdu(self, sending: bool, pdu: Any) -> Any:
        if sending and type(pdu).__name__ == "ExceptionResponse":  # bad address, write to a read-only register, ...
            self.bad_requests += 1
        return pdu

    # -- the access hook (pymodbus' loop thread) ---------------------------------------------------------------------

    async def _access(
        self, fc: int, start: int, address: int, count: int, regs: list[int], values: list[int] | list[bool] | None
    ) -> None:
        """Called by pymodbus for every valid request; ``regs`` is its register block (index = address - start)."""
        fire, recipe = None, None
        if values is not None and address + count > REG_CONTROL:
            fire, recipe = self._on_write(address, [int(v) for v in values])
        if fire is not None and self.service is not None:
            self.service.trigger(self.camera, fire)  # outside the lock: a refusal calls back on_trigger_error
        if recipe is not None:
            self._select_recipe(recipe)
        with self._lock:
            regs[REG_MAP_VERSION - start : STATUS_LEN - start] = self._status_words()

    def _on_write(self, address: int, values: list[int]) -> tuple[str | None, int | None]:
        """Apply a write to the control block; returns (service trigger id to fire, recipe requested), if any."""
        written = dict(zip(range(address, address + len(values)), values, strict=True))
        recipe = written.get(REG_RECIPE_SELECT)
        with self._lock:
            s = self._s
            if REG_TRIGGER_ID in written:
                s.trigger_id = written[REG_TRIGGER_ID] & 0xFFFF
            if REG_CONTROL not in written:
                return None, recipe
            new = written[REG_CONTROL] & 0xFFFF
            rising = new & ~s.control
            s.control = new
            fire = None
            if rising & CTRL_RESULT_ACK:
                if s.result_ready:
                    s.result_ready = False
                    s.trigger_ready = True
                else:
                    s.error = ERR_ACK_WITHOUT_RESULT
                    s.errors += 1
                    log.warning("modbus: RESULT_ACK without a result (ignored)")
            if rising & CTRL_TRIGGER:
                if s.trigger_ready and s.running and not s.stopping:
                    self._n += 1
                    fire = s.pending = f"modbus-{self._n}"
                    s.pending_plc_id = s.trigger_id
                    s.trigger_ready = False
                    s.busy = True
                    s.error = ERR_NONE
                else:
                    s.error = ERR_TRIGGER_NOT_READY
                    s.errors += 1
                    log.warning("modbus: TRIGGER while not TRIGGER_READY (ignored)")
            return fire, recipe

    def _status_words(self) -> list[int]:
        s = self._s
        cam_online = self._camera_online()
        if s.stopping:
            state = STATE_STOPPING
        elif not s.running:
            state = STATE_STARTING
        elif s.result_ready:
            state = STATE_RESULT
        elif s.busy:
            state = STATE_BUSY
        elif not cam_online:
            state = STATE_CAMERA_DOWN
        else:
            state = STATE_READY
        status = (
            (STATUS_TRIGGER_READY if s.trigger_ready and s.running and not s.stopping else 0)
            | (STATUS_RESULT_READY if s.result_ready else 0)
            | (STATUS_CAMERA_ONLINE if cam_online else 0)
            | (STATUS_NG if s.verdict == VERDICT_NG else 0)
            | (STATUS_ERROR if s.verdict == VERDICT_ERROR else 0)
            | (STATUS_RECIPE_BUSY if self._recipe_busy() else 0)
        )
        return [MAP_VERSION, s.heartbeat, state, status, s.verdict, *_u32(s.score), *_u32(s.threshold), *_u32(s.seq),
                s.trigger_id_echo, s.error, self._recipe_index(), *_u32(s.results), *_u32(s.ok), *_u32(s.ng),
                *_u32(s.errors), *_u32(round(self.scale))]  # fmt: skip

    # -- recipes: the station's hot swap (rdedge[ui], ui.bundles_dir) -------------------------------------------------

    def _swapper(self) -> Any:
        svc = self.service
        return next((getattr(o, "swapper", None) for o in (svc.outputs if svc else []) if o.name == "station"), None)

    def _recipe_names(self) -> list[str]:
        sw = self._swapper()
        return [b["name"] for b in sw.bundles() if "error" not in b] if sw is not None else []

    def _recipe_index(self) -> int:
        """Index of the running bundle among the recipes (cached per model object: reads poll this)."""
        svc = self.service
        model = svc.model if svc is not None else None
        if model is None:
            return NO_RECIPE
        if self._recipe_cache[0] is not model:
            sw = self._swapper()
            idx = NO_RECIPE
            if sw is not None and model.bundle_dir.resolve().parent == sw.bundles_dir.resolve():
                names = self._recipe_names()
                if model.bundle_dir.name in names:
                    idx = names.index(model.bundle_dir.name)
            self._recipe_cache = (model, idx)
        return self._recipe_cache[1]

    def _recipe_busy(self) -> bool:
        sw = self._swapper()
        return sw is not None and sw.state != "idle"

    def _select_recipe(self, index: int) -> None:
        """Start the hot swap to recipe ``index``; a refusal sets ERR_RECIPE_REFUSED (the model keeps running)."""
        sw = self._swapper()
        why = None
        if sw is None:
            why = "recipe selection needs the station (ui.enabled) and its bundles_dir"
        else:
            names = self._recipe_names()
            if not 0 <= index < len(names):
                why = f"no recipe {index} ({len(names)} bundle(s) in {sw.bundles_dir})"
            else:
                try:
                    sw.swap(sw.bundles_dir / names[index], user="modbus")
                    log.info("modbus: recipe %d (%s) requested", index, names[index])
                except Exception as exc:  # a swap already running
                    why = str(exc)
        if why is not None:
            log.warning("modbus: recipe %d refused: %s", index, why)
            with self._lock:
                self._s.error = ERR_RECIPE_REFUSED
                self._s.errors += 1

    def _camera_online(self) -> bool:
        svc = self.service
        if svc is None or self.camera not in svc.cams:
            return False
        return svc.cams[self.camera].grabber.state == "up"

    # -- from the service ------------------------------------------------------------------------------------------

    def on_verdict(self, event: VerdictEvent) -> None:
        """Count the camera's verdicts; the one answering the pending trigger becomes the result (scoring thread)."""
        if event.camera != self.camera:
            return
        with self._lock:
            s = self._s
            if event.is_ng:
                s.ng += 1
            else:
                s.ok += 1
            if s.pending is None or event.trigger_id != s.pending:
                return
            s.verdict = VERDICT_NG if event.is_ng else VERDICT_OK
            s.score = _scaled(event.score, self.scale)
            s.threshold = _scaled(event.threshold, self.scale)
            s.seq = event.seq
            s.error = ERR_NONE
            self._complete(s)

    def on_trigger_error(self, camera: str, trigger_id: str | int, error: str) -> None:
        """The pending trigger got no verdict: complete the handshake with verdict ERROR and an error code."""
        with self._lock:
            s = self._s
            if camera != self.camera or s.pending is None or trigger_id != s.pending:
                return
            s.verdict = VERDICT_ERROR
            s.error = _error_code(error)
            s.errors += 1
            self._complete(s)
        log.warning("modbus: trigger %d answered with ERROR: %s", s.pending_plc_id, error)

    @staticmethod
    def _complete(s: _State) -> None:
        s.trigger_id_echo = s.pending_plc_id
        s.pending = None
        s.busy = False
        s.results += 1
        s.result_ready = True  # last: the result registers are already in place under the same lock

    def stats(self) -> dict[str, Any]:
        """``outputs.modbus`` in the stats document."""
        with self._lock:
            s = self._s
            return {
                "state": "up" if self._started.is_set() and self._start_error is None else "down",
                "clients": self.clients,
                "results": s.results,
                "errors": s.errors,
                "bad_requests": self.bad_requests,
                "heartbeat": s.heartbeat,
                "waiting_for": "trigger" if s.trigger_ready else "ack" if s.result_ready else "result",
            }
