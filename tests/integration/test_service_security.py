"""Runtime subprocess: TLS + password file, wrong password, trigger fuzzing, systemd notify."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Runtime, make_folder, results, wait_until, write_config
from tests.mqtt_broker import Broker, Certs, Collector, make_certs, mosquitto_missing


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, Certs]]:
    """mosquitto with TLS (test CA, client certificate required) and a password file (user line1)."""
    why = mosquitto_missing()
    if why:
        pytest.skip(why)
    certs = make_certs(tmp_path / "pki")
    b = Broker(tmp_path / "tlsbroker", tls=certs, users={"line1": "s3cret"})
    b.start()
    yield b, certs
    b.stop()


def _tls_config(tmp_path: Path, bundle: Path, broker: Broker, certs: Certs, folder: Path, **src: object) -> Path:
    tls = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
    cam: dict[str, object] = {"name": "cam1", "source": {"kind": "folder", "path": str(folder), **src}}
    if src.get("loop"):
        cam["max_fps"] = 20  # an endless source: pace it
    cams = [cam]
    return write_config(tmp_path / "c.yaml", bundle, broker, tmp_path / "spool.db", cams, username="line1", tls=tls)


def test_tls_client_cert_and_password_from_credentials_directory(
    tmp_path: Path, tiny_bundle: Path, tls_broker: tuple[Broker, Certs], runtimes: list[Runtime]
) -> None:
    broker, certs = tls_broker
    col = Collector(broker, ["t/#"], tls=certs, user=("line1", "s3cret"))
    cfg = _tls_config(tmp_path, tiny_bundle, broker, certs, make_folder(tmp_path / "imgs", 8))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    rt = Runtime(cfg, tmp_path / "rt.log", env={"CREDENTIALS_DIRECTORY": str(creds)})
    runtimes.append(rt)
    assert rt.wait(30) == 0, rt.log()
    assert col.wait_for(lambda: len(results(col)) >= 8 and col.on("t/dev1/status")[-1:] == [b"stopped"], 5)
    assert sorted(d["seq"] for d in results(col)) == list(range(1, 9))
    assert "with TLS" in rt.log()
    col.close()


def test_wrong_password_clear_error_steady_retry_no_crash(
    tmp_path: Path, tiny_bundle: Path, tls_broker: tuple[Broker, Certs], runtimes: list[Runtime]
) -> None:
    broker, certs = tls_broker
    cfg = _tls_config(tmp_path, tiny_bundle, broker, certs, make_folder(tmp_path / "imgs", 5), loop=True)
    rt = Runtime(cfg, tmp_path / "rt.log", env={"RDEDGE_MQTT_PASSWORD": "wrong", "CREDENTIALS_DIRECTORY": ""})
    runtimes.append(rt)
    time.sleep(5.0)
    assert rt.proc.poll() is None, rt.log()  # still alive: no crash loop
    log = rt.log()
    refused = [ln for ln in log.splitlines() if "refused the connection" in ln]
    assert len(refused) == 1, log  # once per streak, not once per attempt
    assert "Not authorized" in refused[0] or "password" in refused[0]
    attempts = broker.log().count("not authorised") + broker.log().count("not authorized")
    assert 2 <= attempts <= 8, broker.log()[-3000:]  # steady backoff (cap 1 s), no busy loop
    rt.signal(signal.SIGTERM)
    assert rt.wait(5) == 0, rt.log()


def _fuzz(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    gens = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))),
        lambda: json.dumps(rng.choice([None, False, 1.25, "x", [], [{"id": 1}], {"ID": 1}, {"id": None}])).encode(),
        lambda: b"[" * rng.randint(300, 3000),
        lambda: b'{"id": ' * rng.randint(50, 150) + b"1",
        lambda: json.dumps({"id": "y" * rng.randint(129, 500)}).encode(),
        lambda: b"z" * rng.randint(2000, 50_000),
    ]
    return [gens[i % len(gens)]() for i in range(n)]


def test_triggered_mode_fuzz_then_valid_triggers_are_served(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    col = Collector(broker, ["t/#", "plc/#"])
    folder = make_folder(tmp_path / "imgs", 6)
    cams = [{"name": "cam1", "mode": "triggered", "source": {"kind": "folder", "path": str(folder), "loop": True},
             "max_fps": 50}]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    rt = Runtime(cfg, tmp_path / "rt.log")
    runtimes.append(rt)
    assert col.wait_for(lambda: b"online" in col.on("t/dev1/status"), 15), rt.log()
    time.sleep(0.3)  # trigger subscription in place
    payloads = _fuzz(300)
    for p in payloads:
        col.client.publish("t/dev1/cam1/trigger", p, qos=1)
    assert col.wait_for(lambda: len(col.on("/cam1/error")) >= 300, 20), (len(col.on("/cam1/error")), rt.log()[-3000:])
    errors = [json.loads(p) for p in col.on("/cam1/error")]
    assert all(e["error"] and e["camera"] == "cam1" for e in errors)
    assert results(col) == []  # nothing scored for garbage
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "plc/reply"
    props.CorrelationData = b"req-1"
    t0 = time.time()
    col.publish("t/dev1/cam1/trigger", b'{"id": "part-1"}', properties=props)
    col.publish("t/dev1/cam1/trigger", b'{"id": 2}')
    assert col.wait_for(lambda: len(results(col)) >= 2, 10), rt.log()[-3000:]
    docs = results(col)
    assert [d["trigger_id"] for d in docs] == ["part-1", 2]
    assert all(d["frame_ts"] >= t0 - 0.05 for d in docs)  # fresh frames, grabbed after the trigger
    replies = [m for m in col.messages if m[0] == "plc/reply"]
    assert len(replies) == 1 and json.loads(replies[0][1])["trigger_id"] == "part-1"
    assert replies[0][3].CorrelationData == b"req-1"  # type: ignore[attr-defined]
    assert rt.proc.poll() is None
    rt.signal(signal.SIGTERM)
    assert rt.wait(5) == 0, rt.log()
    col.close()


def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path, tiny_bundle: Path, broker: Broker, runtimes: list[Runtime]
) -> None:
    d = Path(tempfile.mkdtemp(prefix="sdn"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "n"))
    sock.settimeout(0.2)
    folder = make_folder(tmp_path / "imgs", 5)
    cams = [{"name": "cam1", "source": {"kind": "folder", "path": str(folder), "loop": True}, "max_fps": 20}]
    cfg = write_config(tmp_path / "c.yaml", tiny_bundle, broker, tmp_path / "spool.db", cams)
    env = {"NOTIFY_SOCKET": str(d / "n"), "WATCHDOG_USEC": "1000000"}
    rt = Runtime(cfg, tmp_path / "rt.log", env=env)
    runtimes.append(rt)
    got: list[str] = []

    def drain() -> bool:
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except TimeoutError:
            return False

    wait_until(lambda: drain() or any("READY=1" in m for m in got) and got.count("WATCHDOG=1") >= 2, 15)
    assert any("READY=1" in m for m in got), (got, rt.log())
    assert got.count("WATCHDOG=1") >= 2
    rt.signal(signal.SIGTERM)
    assert rt.wait(5) == 0
    drain()
    assert any("STOPPING=1" in m for m in got)
    sock.close()
    os.unlink(d / "n")
    d.rmdir()
