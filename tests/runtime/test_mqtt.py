"""MqttLink against a real mosquitto: availability, spool delivery across outages, auth refusal, TLS, triggers."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest

from runtime.config import MqttConfig, TlsConfig
from runtime.mqtt import MAX_TRIGGER_BYTES, MqttLink, TriggerError, TriggerRequest, parse_trigger
from runtime.spool import OutMessage, Spool
from tests.mqtt_broker import Broker, Collector, make_certs, mosquitto_missing


def _cfg(broker: Broker, **kw: object) -> MqttConfig:
    base: dict[str, object] = {"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "t",
                               "reconnect_max_s": 1.0, "keepalive_s": 5}  # fmt: skip
    base.update(kw)
    return MqttConfig.model_validate(base)


def _result(seq: int) -> list[OutMessage]:
    return [OutMessage("t/dev1/cam/result", json.dumps({"seq": seq}).encode(), qos=1)]


def _seqs(col: Collector) -> list[int]:
    return [json.loads(p)["seq"] for p in col.on("/cam/result")]


def test_status_online_then_stopped_and_results_delivered(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, ["t/#"])
    spool = Spool(tmp_path / "s.db")
    link = MqttLink(_cfg(broker), spool, cameras=["cam"])
    link.start()
    try:
        assert link.wait_connected(10)
        link.set_camera_status("cam", "up")
        for _ in range(50):
            link.enqueue(_result)
        assert col.wait_for(lambda: len(col.on("/cam/result")) >= 50)
        assert _seqs(col) == list(range(1, 51))  # in order on one connection
        assert link.flush(5) and spool.depth == 0
        assert col.on("t/dev1/status")[0] == b"online"
        assert col.on("t/dev1/cam/status") == [b"up"]
    finally:
        link.close()
    assert col.wait_for(lambda: col.on("t/dev1/status")[-1:] == [b"stopped"])
    col.close()
    # retained for a late subscriber
    late = Collector(broker, ["t/dev1/status"])
    assert late.wait_for(lambda: late.on("status") == [b"stopped"])
    late.close()


def test_offline_results_are_spooled_and_sent_after_broker_restart(broker: Broker, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    link = MqttLink(_cfg(broker), spool)
    link.start()
    try:
        assert link.wait_connected(10)
        for _ in range(10):
            link.enqueue(_result)
        assert link.flush(5)
        broker.stop()
        deadline = time.monotonic() + 5
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected
        for _ in range(30):
            link.enqueue(_result)
        time.sleep(1.5)
        assert spool.depth == 30  # nothing silently dropped while offline
        broker.start()
        col = Collector(broker, ["t/dev1/cam/result"])
        assert link.wait_connected(10)
        assert link.flush(10), f"spool depth {spool.depth}"
        assert col.wait_for(lambda: set(range(11, 41)) <= set(_seqs(col)))
        assert link.reconnects == 1
        col.close()
    finally:
        link.close()


def test_backlog_from_previous_process_is_sent_in_order(broker: Broker, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    for _ in range(25):
        spool.add(_result)
    col = Collector(broker, ["t/dev1/cam/result"])
    link = MqttLink(_cfg(broker, max_inflight=5), spool)
    link.start()
    try:
        assert col.wait_for(lambda: len(_seqs(col)) >= 25)
        assert _seqs(col) == list(range(1, 26))
        assert link.flush(5)
    finally:
        link.close()
        col.close()


def test_wrong_password_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    b = Broker(tmp_path / "b", users={"line1": "right"})
    b.start()
    monkeypatch.setenv("T_PW", "wrong")
    spool = Spool(tmp_path / "s.db")
    link = MqttLink(_cfg(b, username="line1", password_env="T_PW", password_credential=None), spool)
    caplog.set_level(logging.INFO, logger="runtime.mqtt")
    try:
        link.start()
        link.enqueue(_result)
        time.sleep(3.5)
        assert not link.connected
        assert 2 <= link.refusals <= 5  # steady backoff (1 s cap here), no busy loop
        refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in caplog.records]
        assert "Not authorized" in refused[0].getMessage() or "password" in refused[0].getMessage()
        assert spool.depth == 1
    finally:
        link.close()
        b.stop()


def test_tls_with_client_cert_and_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    certs = make_certs(tmp_path / "pki")
    b = Broker(tmp_path / "b", tls=certs, users={"line1": "s3cret"})
    b.start()
    cred = tmp_path / "creds"
    cred.mkdir()
    (cred / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred))
    col = Collector(b, ["t/#"], tls=certs, user=("line1", "s3cret"))
    tls = TlsConfig(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    link = MqttLink(_cfg(b, username="line1", tls=tls), Spool(tmp_path / "s.db"))
    link.start()
    try:
        assert link.wait_connected(10), b.log()[-2000:]
        link.enqueue(_result)
        assert col.wait_for(lambda: _seqs(col) == [1])
    finally:
        link.close()
        col.close()
        b.stop()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b'{"id": 17}', 17), (b'{"id": "part-0042", "x": [1]}', "part-0042"), ('{"id": "ünï"}'.encode(), "ünï")],
)
def test_parse_trigger_valid(payload: bytes, expected: object) -> None:
    assert parse_trigger(payload) == expected


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1,2]", "object"),
        (b"17", "object"),
        (b"{}", 'no "id"'),
        (b'{"id": true}', "string or an integer"),
        (b'{"id": 1.5}', "string or an integer"),
        (b'{"id": null}', "string or an integer"),
        (b'{"id": ""}', "1..128"),
        (b'{"id": 99999999999999999999999}', "64-bit"),
        (b"[" * 100_000, "too large"),
        (b"[" * 400 + b"]" * 400, "object"),
        (b'{"a":' * 150 + b"1" + b"}" * 150, 'no "id"'),
    ],
)
def test_parse_trigger_invalid(payload: bytes, why: str) -> None:
    with pytest.raises(TriggerError, match=why):
        parse_trigger(payload)


def _fuzz_payloads(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out: list[bytes] = []
    shapes = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        lambda: json.dumps(rng.choice([None, True, 3.5, "id", [1], {"idx": 1}, {"id": [1]}, {"id": {}}])).encode(),
        lambda: b"[" * rng.randint(500, 1000),
        lambda: b'{"id":' * rng.randint(100, 170) + b"1" + b"}" * rng.randint(0, 170),
        lambda: b'{"id": "' + b"x" * rng.randint(129, 900) + b'"}',
        lambda: b"x" * rng.randint(MAX_TRIGGER_BYTES + 1, 20_000),
        lambda: b'{"id": ' + str(rng.choice([1e400, -(2**70)])).encode() + b"}",
    ]
    for i in range(n):
        out.append(shapes[i % len(shapes)]())
    return out


def test_trigger_fuzz_gets_error_replies_and_valid_triggers_still_served(broker: Broker, tmp_path: Path) -> None:
    got: list[TriggerRequest] = []
    link = MqttLink(_cfg(broker), Spool(tmp_path / "s.db"), cameras=["cam"], triggered=["cam"], on_trigger=got.append)
    col = Collector(broker, ["t/dev1/cam/error", "plc/replies"])
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.3)  # subscription in place
        payloads = _fuzz_payloads(300)
        bad = 0
        for p in payloads:
            try:
                parse_trigger(p)
            except TriggerError:
                bad += 1
            col.client.publish("t/dev1/cam/trigger", p, qos=1)
        assert bad == 300
        assert col.wait_for(lambda: len(col.on("/cam/error")) >= 300, timeout=15), len(col.on("/cam/error"))
        for body in col.on("/cam/error"):
            doc = json.loads(body)
            assert doc["device"] == "dev1" and doc["camera"] == "cam" and doc["error"]
        # a valid trigger after the storm, with an MQTT v5 response topic and correlation data
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "plc/replies"
        props.CorrelationData = b"\x01\x02"
        col.publish("t/dev1/cam/trigger", b'{"id": 7}', properties=props)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and got[0].id == 7 and got[0].response_topic == "plc/replies" and got[0].correlation == b"\x01\x02"
        # a bad one with a response topic: error goes there too, with the correlation data
        col.publish("t/dev1/cam/trigger", b"nope", properties=props)
        assert col.wait_for(lambda: len(col.on("plc/replies")) == 1)
        reply = [m for m in col.messages if m[0] == "plc/replies"][0]
        assert reply[3].CorrelationData == b"\x01\x02"  # type: ignore[attr-defined]
        assert link.bad_triggers == 301
    finally:
        link.close()
        col.close()
