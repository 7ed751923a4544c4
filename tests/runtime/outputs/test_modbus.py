"""Modbus TCP server: a real pymodbus client plays the PLC against the running service on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.config import parse_config
from runtime.errors import ConfigError
from runtime.service import run_service
from tests.mqtt_broker import free_port

pytest.importorskip("pymodbus")

from pymodbus.client import ModbusTcpClient  # noqa: E402

from runtime.outputs import modbus as mb  # noqa: E402


def _folder(path: Path, n: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        cv2.imwrite(str(path / f"{i:03d}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return path


def _cfg(tmp_path: Path, bundle: Path, port: int, **modbus: Any) -> dict[str, Any]:
    src = {"kind": "folder", "path": str(_folder(tmp_path / "imgs", 4)), "loop": True}
    return {
        "bundle": str(bundle),
        "mqtt": None,
        "cameras": [{"name": "cam1", "mode": "triggered", "source": src, "max_fps": 100, "no_frame_timeout_s": 2}],
        "modbus": {"enabled": True, "port": port, "heartbeat_s": 0.05, **modbus},
    }


@pytest.fixture
def plc(tmp_path: Path, tiny_bundle: Path) -> Iterator[ModbusTcpClient]:
    port = free_port()
    cfg = parse_config(_cfg(tmp_path, tiny_bundle, port))
    stop = threading.Event()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(run_service(cfg, stop)), daemon=True)
    t.start()
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    deadline = time.monotonic() + 20
    while not client.connect():
        assert time.monotonic() < deadline and t.is_alive(), "modbus server did not come up"
        time.sleep(0.1)
    while _status(client)[mb.REG_STATE] != mb.STATE_READY:  # model loaded, camera up
        assert time.monotonic() < deadline, _status(client)
        time.sleep(0.05)
    yield client
    client.close()
    stop.set()
    t.join(10)
    assert not t.is_alive() and rc == [0]


def _status(c: ModbusTcpClient) -> list[int]:
    r = c.read_holding_registers(0, count=mb.STATUS_LEN)
    assert not r.isError(), r
    return list(r.registers)


def _u32(regs: list[int], at: int) -> int:
    return (regs[at] << 16) | regs[at + 1]


def _wait(c: ModbusTcpClient, cond: Any, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        regs = _status(c)
        if cond(regs):
            return regs
        assert time.monotonic() < deadline, regs
        time.sleep(0.002)


def test_200_handshake_cycles_each_get_their_own_result(plc: ModbusTcpClient) -> None:
    regs = _status(plc)
    assert regs[mb.REG_MAP_VERSION] == mb.MAP_VERSION and regs[mb.REG_SCALE + 1] == 10000
    hb0 = regs[mb.REG_HEARTBEAT]
    seqs: list[int] = []
    for i in range(200):
        plc_id = 1000 + i
        regs = _wait(plc, lambda r: r[mb.REG_STATUS] & mb.STATUS_TRIGGER_READY)
        assert not regs[mb.REG_STATUS] & mb.STATUS_RESULT_READY
        assert not plc.write_register(mb.REG_TRIGGER_ID, plc_id).isError()
        assert not plc.write_register(mb.REG_CONTROL, mb.CTRL_TRIGGER).isError()
        # Ready drops at once: the write is handled before the reply, so no stale result can be read after it.
        regs = _status(plc)
        assert not regs[mb.REG_STATUS] & mb.STATUS_TRIGGER_READY
        assert not regs[mb.REG_STATUS] & mb.STATUS_RESULT_READY or regs[mb.REG_TRIGGER_ID_ECHO] == plc_id
        regs = _wait(plc, lambda r: r[mb.REG_STATUS] & mb.STATUS_RESULT_READY)
        assert regs[mb.REG_STATE] == mb.STATE_RESULT
        assert regs[mb.REG_TRIGGER_ID_ECHO] == plc_id, "a stale result"
        assert regs[mb.REG_VERDICT] in (mb.VERDICT_OK, mb.VERDICT_NG), regs
        assert regs[mb.REG_ERROR] == mb.ERR_NONE
        assert _u32(regs, mb.REG_RESULTS) == i + 1
        score = _u32(regs, mb.REG_SCORE) / 10000
        thr = _u32(regs, mb.REG_THRESHOLD) / 10000
        assert (score >= thr) == (regs[mb.REG_VERDICT] == mb.VERDICT_NG) or abs(score - thr) < 2e-4
        seqs.append(_u32(regs, mb.REG_SEQ))
        # PLC: drop trigger, raise ack; rdedge clears result-ready and is ready again; PLC drops ack.
        assert not plc.write_register(mb.REG_CONTROL, mb.CTRL_RESULT_ACK).isError()
        regs = _status(plc)
        assert not regs[mb.REG_STATUS] & mb.STATUS_RESULT_READY and regs[mb.REG_STATUS] & mb.STATUS_TRIGGER_READY
        assert not plc.write_register(mb.REG_CONTROL, 0).isError()
    assert seqs == list(range(seqs[0], seqs[0] + 200)), "one verdict per cycle, none skipped or repeated"
    regs = _status(plc)
    assert _u32(regs, mb.REG_OK) + _u32(regs, mb.REG_NG) == 200
    assert (regs[mb.REG_HEARTBEAT] - hb0) % 65536 >= 5, "heartbeat advances"


def test_malformed_writes_leave_the_service_up(plc: ModbusTcpClient) -> None:
    assert plc.write_register(5000, 1).isError()  # out of range
    assert plc.write_register(50, 1).isError()  # gap between the blocks
    assert plc.write_register(mb.REG_STATE, 7).isError()  # status block is read-only
    assert plc.write_registers(mb.REG_TRIGGER_ID, [1, 2, 3]).isError()  # runs past the control block
    assert plc.read_holding_registers(90, count=20).isError()
    regs = _status(plc)
    assert regs[mb.REG_STATE] == mb.STATE_READY and regs[mb.REG_ERRORS + 1] == 0
    # ack without a result: refused with an error code, nothing else changes
    assert not plc.write_register(mb.REG_CONTROL, mb.CTRL_RESULT_ACK).isError()
    regs = _status(plc)
    assert regs[mb.REG_ERROR] == mb.ERR_ACK_WITHOUT_RESULT and _u32(regs, mb.REG_ERRORS) == 1
    assert regs[mb.REG_STATUS] & mb.STATUS_TRIGGER_READY
    assert not plc.write_register(mb.REG_CONTROL, 0).isError()
    # a second trigger while the first is pending is refused; the first still gets its result
    assert not plc.write_registers(mb.REG_CONTROL, [mb.CTRL_TRIGGER, 7]).isError()  # id and trigger in one write
    assert not plc.write_register(mb.REG_CONTROL, 0).isError()
    assert not plc.write_register(mb.REG_CONTROL, mb.CTRL_TRIGGER).isError()
    regs = _wait(plc, lambda r: r[mb.REG_STATUS] & mb.STATUS_RESULT_READY)
    assert regs[mb.REG_TRIGGER_ID_ECHO] == 7 and _u32(regs, mb.REG_RESULTS) == 1
    assert _u32(regs, mb.REG_ERRORS) >= 1
    assert not plc.write_register(mb.REG_CONTROL, mb.CTRL_RESULT_ACK).isError()
    assert _status(plc)[mb.REG_STATE] in (mb.STATE_READY, mb.STATE_BUSY, mb.STATE_RESULT)
    # still serving: a full cycle after all that
    assert not plc.write_register(mb.REG_CONTROL, 0).isError()
    assert not plc.write_registers(mb.REG_CONTROL, [mb.CTRL_TRIGGER, 8]).isError()
    regs = _wait(plc, lambda r: r[mb.REG_STATUS] & mb.STATUS_RESULT_READY and r[mb.REG_TRIGGER_ID_ECHO] == 8)
    assert regs[mb.REG_VERDICT] in (mb.VERDICT_OK, mb.VERDICT_NG)


def test_config_needs_a_triggered_camera(tmp_path: Path, tiny_bundle: Path) -> None:
    data = _cfg(tmp_path, tiny_bundle, 1502)
    data["cameras"][0]["mode"] = "continuous"
    with pytest.raises(ConfigError, match="modbus.enabled needs a camera with mode: triggered"):
        parse_config(data)
    data["cameras"][0]["mode"] = "triggered"
    data["modbus"]["camera"] = "nope"
    with pytest.raises(ConfigError, match="modbus.camera"):
        parse_config(data)
    data["modbus"] = {"enabled": True, "port": 70000}
    with pytest.raises(ConfigError, match="modbus.port"):
        parse_config(data)


def test_stats_and_retained_status_topic(tmp_path: Path, tiny_bundle: Path) -> None:
    from tests.mqtt_broker import Broker, Collector, mosquitto_missing

    if mosquitto_missing():
        pytest.skip(str(mosquitto_missing()))
    with Broker(tmp_path / "broker") as broker:
        col = Collector(broker, ["t/dev1/#"])
        data = _cfg(tmp_path, tiny_bundle, free_port())
        data["mqtt"] = {"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "t",
                        "stats_interval_s": 0.2}  # fmt: skip
        data["spool"] = {"path": str(tmp_path / "spool.db")}
        stop = threading.Event()
        t = threading.Thread(target=run_service, args=(parse_config(data), stop), daemon=True)
        t.start()
        assert col.wait_for(lambda: col.on("t/dev1/line/modbus/status") == [b"up"], 20)
        assert col.wait_for(lambda: bool(col.on("t/dev1/stats")), 5)
        import json

        stats = json.loads(col.on("t/dev1/stats")[-1])
        assert stats["outputs"]["modbus"]["state"] == "up" and stats["outputs"]["modbus"]["waiting_for"] == "trigger"
        stop.set()
        t.join(10)
        assert col.wait_for(lambda: col.on("t/dev1/line/modbus/status")[-1:] == [b"stopped"], 5)
        col.close()


def test_recipe_select_hot_swaps_through_the_station(tmp_path: Path, tiny_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    import shutil

    from runtime.service import Service
    from tests.helpers.onnx_bundle import make_tiny_bundle

    bundles = tmp_path / "bundles"
    shutil.copytree(tiny_bundle, bundles / "seed0")
    make_tiny_bundle(bundles / "seed1", seed=1)
    data = _cfg(tmp_path, bundles / "seed0", free_port())
    data["ui"] = {"enabled": True, "port": free_port(), "state_dir": str(tmp_path / "state"),
                  "bundles_dir": str(bundles), "archive": {"dir": str(tmp_path / "archive")}}  # fmt: skip
    svc = Service(parse_config(data), threading.Event())
    svc.open()
    threading.Thread(target=svc.loop, daemon=True).start()
    plc = ModbusTcpClient("127.0.0.1", port=data["modbus"]["port"], timeout=2)
    try:
        assert plc.connect()
        assert _status(plc)[mb.REG_RECIPE] == 0  # seed0 is the first bundle of bundles_dir
        assert not plc.write_register(mb.REG_RECIPE_SELECT, 5).isError()
        regs = _status(plc)
        assert regs[mb.REG_ERROR] == mb.ERR_RECIPE_REFUSED and regs[mb.REG_RECIPE] == 0
        assert not plc.write_register(mb.REG_RECIPE_SELECT, 1).isError()
        _wait(plc, lambda r: r[mb.REG_RECIPE] == 1 and not r[mb.REG_STATUS] & mb.STATUS_RECIPE_BUSY, 30)
        assert svc.model is not None and svc.model.model_id == "tiny-rd-s64-seed1"
        # the next cycle is scored by the new recipe
        assert not plc.write_registers(mb.REG_CONTROL, [mb.CTRL_TRIGGER, 9]).isError()
        regs = _wait(plc, lambda r: r[mb.REG_STATUS] & mb.STATUS_RESULT_READY)
        assert regs[mb.REG_TRIGGER_ID_ECHO] == 9 and regs[mb.REG_ERROR] == mb.ERR_NONE
    finally:
        plc.close()
        svc.stop.set()
        time.sleep(0.2)
        svc.close(ended=False)
