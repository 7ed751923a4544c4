"""`rdedge run` with Modbus, OPC UA and Sparkplug B all on: one PLC cycle, then SIGTERM stops them in reverse order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.mqtt_broker import Broker, Collector, free_port, mosquitto_missing

pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")
pytestmark = pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing()))

from pymodbus.client import ModbusTcpClient  # noqa: E402

from runtime.outputs import modbus as mb  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_all_line_interfaces_start_serve_and_stop_in_reverse_order(tmp_path: Path, tiny_bundle: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        cv2.imwrite(str(imgs / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    mport, uport = free_port(), free_port()
    with Broker(tmp_path / "broker") as broker:
        col = Collector(broker, ["t/#", "spBv1.0/#"])
        cfg = {
            "bundle": str(tiny_bundle),
            "mqtt": {"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "t",
                     "stats_interval_s": 0.3},
            "spool": {"path": str(tmp_path / "spool.db")},
            "cameras": [{"name": "cam1", "mode": "triggered", "max_fps": 50,
                         "source": {"kind": "folder", "path": str(imgs), "loop": True}}],
            "modbus": {"enabled": True, "port": mport},
            "opcua": {"enabled": True, "port": uport, "cert_dir": str(tmp_path / "pki"),
                      "users": [{"name": "plc", "password_env": "RDEDGE_TEST_UA_PW"}]},
            "sparkplug": {"enabled": True, "host": broker.host, "port": broker.port, "group_id": "g",
                          "state_dir": str(tmp_path / "spb")},
        }  # fmt: skip
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        script = Path(sys.executable).parent / "rdedge"
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "export.cli"]
        logf = open(tmp_path / "rt.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([*cmd, "run", "--config", str(tmp_path / "c.yaml")], stdout=logf,
                                stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "RDEDGE_TEST_UA_PW": "pw"})  # fmt: skip
        log = lambda: (tmp_path / "rt.log").read_text(errors="replace")  # noqa: E731
        try:
            plc = ModbusTcpClient("127.0.0.1", port=mport, timeout=2)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log()[-3000:]
                if plc.connect():
                    r = plc.read_holding_registers(0, count=mb.STATUS_LEN)
                    if not r.isError() and r.registers[mb.REG_STATE] == mb.STATE_READY:
                        break
                time.sleep(0.2)
            assert not plc.write_registers(mb.REG_CONTROL, [mb.CTRL_TRIGGER, 42]).isError()
            while not plc.read_holding_registers(0, count=mb.STATUS_LEN).registers[mb.REG_STATUS] & 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            plc.close()
            for name in ("modbus", "opcua", "sparkplug"):
                assert col.wait_for(lambda n=name: col.on(f"t/dev1/line/{n}/status")[-1:] == [b"up"], 10), name
            assert col.wait_for(lambda: bool(col.on("/DDATA/dev1/cam1")), 10)  # the Modbus-triggered verdict
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log()[-3000:]
            assert time.monotonic() - t0 < 5.0, "inside systemd's stop budget"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            logf.close()
        assert col.wait_for(lambda: bool(col.on("/NDEATH/dev1")), 5)
        for name in ("modbus", "opcua", "sparkplug"):
            assert col.wait_for(lambda n=name: col.on(f"t/dev1/line/{n}/status")[-1:] == [b"stopped"], 5), name
        col.close()
    text = log()
    stops = [text.index(f"{n}: stopped") for n in ("sparkplug", "opcua", "modbus")]
    assert stops == sorted(stops), "outputs stop in the reverse of their start order"
    assert b'"trigger_id":"modbus-1"' in b"".join(col.on("t/dev1/cam1/result"))
