"""PLC trigger -> result round trip over Modbus TCP, OPC UA and MQTT, against one running service.

The service runs in-process with MQTT (a real mosquitto on a free loopback port), the Modbus server and the OPC UA
server all on, one triggered camera replaying an image folder at ``--fps`` (the trigger is served on the first frame
grabbed after it, so up to 1/fps of each round trip is the wait for that frame). The three PLC sides take turns,
``--cycles`` each, one trigger at a time:

* Modbus: one function-code-16 write (TRIGGER_ID + TRIGGER), then reads of the status block every ``--poll-ms``
  until RESULT_READY with the echoed id; ack. Measured: write sent -> RESULT_READY read.
* OPC UA: the Trigger method call, then the ResultReady event (subscription publishing interval ``--opcua-ms``).
  Measured: call sent -> event received.
* MQTT: ``{"id": n}`` on ``<camera>/trigger`` (QoS 1), then the ``<camera>/result`` message with that trigger_id.
  Measured: publish -> result received.

    python benchmarks/line_roundtrip.py [--bundle DIR] [--cycles 200] [--fps 100]

Without ``--bundle`` the 64x64 test bundle (tests/helpers/onnx_bundle.py) is built in a temporary folder, so the
figures are mostly interface overhead. Writes ``benchmarks/results/line_roundtrip.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.config import parse_config  # noqa: E402
from runtime.outputs import modbus as mb  # noqa: E402
from runtime.service import Service  # noqa: E402
from tests.mqtt_broker import Broker, Collector, free_port  # noqa: E402


def summary(ms: list[float]) -> dict[str, Any]:
    a = np.asarray(ms)
    q = {f"p{p}_ms": round(float(np.percentile(a, p)), 3) for p in (50, 90, 99)}
    return {"n": len(ms), **q, "max_ms": round(float(a.max()), 3), "mean_ms": round(float(a.mean()), 3)}


def bench_modbus(port: int, cycles: int, poll_s: float) -> list[float]:
    from pymodbus.client import ModbusTcpClient

    c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    assert c.connect()
    out = []
    for i in range(cycles):
        plc_id = (i + 1) % 65536
        t0 = time.perf_counter()
        assert not c.write_registers(mb.REG_CONTROL, [mb.CTRL_TRIGGER, plc_id]).isError()
        while True:
            r = c.read_holding_registers(0, count=mb.STATUS_LEN).registers
            if r[mb.REG_STATUS] & mb.STATUS_RESULT_READY and r[mb.REG_TRIGGER_ID_ECHO] == plc_id:
                break
            time.sleep(poll_s)
        out.append((time.perf_counter() - t0) * 1e3)
        assert r[mb.REG_VERDICT] in (mb.VERDICT_OK, mb.VERDICT_NG), r
        c.write_register(mb.REG_CONTROL, mb.CTRL_RESULT_ACK)
        c.write_register(mb.REG_CONTROL, 0)
    c.close()
    return out


async def bench_opcua(url: str, cycles: int, publish_ms: float) -> list[float]:
    from asyncua import Client

    client = Client(url)
    client.set_user("bench")
    client.set_password("bench-pw")
    got: dict[str, float] = {}
    arrived = asyncio.Event()

    class Handler:
        def event_notification(self, event: Any) -> None:
            got[str(event.TriggerId)] = time.perf_counter()
            arrived.set()

    out = []
    async with client:
        idx = await client.get_namespace_index("urn:rdedge:machinevision")
        vs = await client.nodes.objects.get_child(f"{idx}:VisionSystem")
        etype = await client.nodes.base_event_type.get_child(f"{idx}:ResultReadyEventType")
        sub = await client.create_subscription(publish_ms, Handler())
        await sub.subscribe_events(vs, etype, queuesize=100)
        await asyncio.sleep(0.5)
        for i in range(cycles):
            tid = f"ua-{i}"
            t0 = time.perf_counter()
            assert await vs.call_method(f"{idx}:Trigger", "cam1", tid) is True
            while tid not in got:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 10)
            out.append((got[tid] - t0) * 1e3)
        await sub.delete()
    return out


def nodelay(sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bench_mqtt(broker: Broker, cycles: int, no_delay: bool = False) -> list[float]:
    col = Collector(broker, ["b/dev1/cam1/result"])
    if no_delay:
        nodelay(col.client.socket())
    out = []
    for i in range(cycles):
        n0 = len(col.messages)
        t0 = time.perf_counter()
        col.client.publish("b/dev1/cam1/trigger", json.dumps({"id": 100000 + i}), qos=1)

        def answered(i: int = i, n0: int = n0) -> bool:
            return any(json.loads(p).get("trigger_id") == 100000 + i for _t, p, _r, _pr in col.messages[n0:])

        assert col.wait_for(answered, 10)
        out.append((time.perf_counter() - t0) * 1e3)
    col.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: the 64x64 test bundle)")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--fps", type=float, default=100.0, help="camera rate (max_fps of the replayed folder)")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="Modbus PLC poll period")
    ap.add_argument("--opcua-ms", type=float, default=10.0, help="OPC UA subscription publishing interval")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "line_roundtrip.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s, Broker(Path(tmp_s) / "broker") as broker:
        tmp = Path(tmp_s)
        bundle = args.bundle
        if bundle is None:
            from tests.helpers.onnx_bundle import make_tiny_bundle

            bundle = make_tiny_bundle(tmp / "bundle")
        imgs = tmp / "imgs"
        imgs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(8):
            cv2.imwrite(str(imgs / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        os.environ["RDEDGE_BENCH_OPCUA_PW"] = "bench-pw"
        mport, uport = free_port(), free_port()
        cfg = parse_config({
            "bundle": str(bundle),
            "mqtt": {"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "b",
                     "stats_interval_s": 5},
            "spool": {"path": str(tmp / "spool.db")},
            "cameras": [{"name": "cam1", "mode": "triggered", "max_fps": args.fps,
                         "source": {"kind": "folder", "path": str(imgs), "loop": True}}],
            "modbus": {"enabled": True, "port": mport},
            "opcua": {"enabled": True, "port": uport, "cert_dir": str(tmp / "pki"),
                      "users": [{"name": "bench", "password_env": "RDEDGE_BENCH_OPCUA_PW"}]},
        })  # fmt: skip
        svc = Service(cfg, threading.Event())
        svc.open()  # returns once every output is serving
        t = threading.Thread(target=svc.loop, daemon=True)
        t.start()
        assert svc.link is not None and svc.link.wait_connected(10)
        time.sleep(1.0)
        results: dict[str, Any] = {}
        url = f"opc.tcp://127.0.0.1:{uport}/rdedge/"
        try:
            bench_modbus(mport, 10, args.poll_ms / 1e3)  # warm-up cycles, not counted
            results["modbus"] = summary(bench_modbus(mport, args.cycles, args.poll_ms / 1e3))
            asyncio.run(bench_opcua(url, 10, args.opcua_ms))
            results["opcua"] = summary(asyncio.run(bench_opcua(url, args.cycles, args.opcua_ms)))
            bench_mqtt(broker, 10)
            results["mqtt"] = summary(bench_mqtt(broker, args.cycles))
            # The same with Nagle off on every hop (paho never sets TCP_NODELAY; mosquitto's set_tcp_nodelay is off
            # by default): is the MQTT figure the 40 ms delayed-ACK stall of small writes?
            broker.stop()
            with open(broker.conf_path, "a") as f:
                f.write("set_tcp_nodelay true\n")
            broker.start()
            deadline = time.monotonic() + 30
            while not svc.link.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            nodelay(svc.link.client.socket())
            time.sleep(1.0)
            bench_mqtt(broker, 10, no_delay=True)
            results["mqtt_tcp_nodelay"] = summary(bench_mqtt(broker, args.cycles, no_delay=True))
        finally:
            svc.stop.set()
            t.join(10)
            svc.close(ended=False)
    doc = {
        "benchmark": "line_roundtrip",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "bundle": str(args.bundle) if args.bundle else "tests/helpers/onnx_bundle.py 64x64 tiny bundle",
        "cycles": args.cycles,
        "camera_fps": args.fps,
        "modbus_poll_ms": args.poll_ms,
        "opcua_publishing_ms": args.opcua_ms,
        "round_trip": results,
        "note": "trigger -> result seen by the PLC side; includes the wait for the next frame (<= 1/fps), scoring "
        "and the spool commit; 10 warm-up cycles per protocol not counted; mqtt_tcp_nodelay: the MQTT run again "
        "with TCP_NODELAY on rdedge's and the subscriber's sockets and set_tcp_nodelay in mosquitto",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
