"""TLS failures named for what they are (wrong CA, hostname mismatch, expired certificate), once per streak, against
a real mosquitto with test-made certificates; ``tls.insecure`` warns at start; no per-attempt paho noise."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.config import MqttConfig
from runtime.mqtt import MqttLink
from runtime.spool import Spool
from tests.mqtt_broker import OPENSSL, Broker, Certs, make_certs, mosquitto_missing


def _server_cert(pki: Path, name: str, san: str, days: int) -> tuple[Path, Path]:
    """A server certificate signed by ``pki``'s CA (``make_certs``): ``san`` e.g. ``DNS:broker.invalid``; ``days=0``
    gives a certificate that expires the second it is made."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (pki / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    run = {"cwd": pki, "check": True, "capture_output": True, "timeout": 30}
    subprocess.run([OPENSSL, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                    f"/CN=rdedge-{name}"], **run)  # type: ignore[call-overload]  # fmt: skip
    subprocess.run([OPENSSL, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext"],
                   **run)  # type: ignore[call-overload]  # fmt: skip
    (pki / f"{name}.key").chmod(0o644)
    return pki / f"{name}.crt", pki / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Certs:
    if mosquitto_missing():
        pytest.skip(str(mosquitto_missing()))
    return make_certs(tmp_path / "pki")


def _broker(tmp_path: Path, certs: Certs, cert: Path | None = None, key: Path | None = None) -> Broker:
    tls = certs if cert is None else Certs(certs.ca, cert, key or certs.server_key, certs.client_cert,
                                           certs.client_key)  # fmt: skip
    return Broker(tmp_path / "broker", tls=tls, require_client_cert=False).start()


def _link(tmp_path: Path, broker: Broker, ca: Path, **tls: object) -> MqttLink:
    cfg = MqttConfig.model_validate({"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "t",
                                     "reconnect_max_s": 1.0, "keepalive_s": 5,
                                     "tls": {"ca_file": str(ca), **tls}})  # fmt: skip
    return MqttLink(cfg, Spool(tmp_path / "s.db"))


@pytest.fixture
def mqtt_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="runtime.mqtt")
    yield caplog


def _run_failing(link: MqttLink, seconds: float) -> None:
    link.start()
    try:
        time.sleep(seconds)  # 1 s backoff: several attempts
        assert not link.connected
    finally:
        link.close(flush_s=0.1)


def _mqtt_lines(caplog: pytest.LogCaptureFixture, min_level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("runtime.mqtt") and r.levelno >= min_level]


def _assert_named_once(caplog: pytest.LogCaptureFixture, *needles: str) -> None:
    lines = _mqtt_lines(caplog, logging.WARNING)
    named = [r for r in lines if all(n in r.getMessage() for n in needles)]
    assert len(named) == 1, [r.getMessage() for r in lines]  # once per streak, not per attempt
    assert named[0].levelno == logging.ERROR
    assert not any("unreachable" in r.getMessage() for r in lines), [r.getMessage() for r in lines]
    # paho's per-attempt "Client is not connected" ERROR is gone (at every level)
    assert not any("Client is not connected" in r.getMessage() for r in caplog.records)


def test_wrong_ca_is_named(tmp_path: Path, pki: Certs, mqtt_log: pytest.LogCaptureFixture) -> None:
    broker = _broker(tmp_path, pki)
    other = make_certs(tmp_path / "other-pki")
    try:
        _run_failing(_link(tmp_path, broker, other.ca), 3.5)
    finally:
        broker.stop()
    _assert_named_once(mqtt_log, "TLS certificate verification failed", "wrong CA")


def test_hostname_mismatch_is_named_and_insecure_warns_then_connects(
    tmp_path: Path, pki: Certs, mqtt_log: pytest.LogCaptureFixture
) -> None:
    cert, key = _server_cert(pki.ca.parent, "elsewhere", "DNS:broker.invalid", days=2)
    broker = _broker(tmp_path, pki, cert, key)
    try:
        _run_failing(_link(tmp_path, broker, pki.ca), 3.5)
        _assert_named_once(mqtt_log, "TLS certificate verification failed", "mismatch")
        mqtt_log.clear()
        link = _link(tmp_path, broker, pki.ca, insecure=True)
        warned = [r for r in _mqtt_lines(mqtt_log, logging.WARNING) if "insecure" in r.getMessage()]
        assert len(warned) == 1 and "NOT checked" in warned[0].getMessage()
        link.start()
        try:
            assert link.wait_connected(10)  # insecure skips exactly the hostname check
        finally:
            link.close(flush_s=0.1)
    finally:
        broker.stop()


def test_expired_certificate_is_named(tmp_path: Path, pki: Certs, mqtt_log: pytest.LogCaptureFixture) -> None:
    cert, key = _server_cert(pki.ca.parent, "expired", "IP:127.0.0.1,DNS:localhost", days=0)
    time.sleep(1.1)  # notAfter == notBefore: expired from the next second on
    broker = _broker(tmp_path, pki, cert, key)
    try:
        _run_failing(_link(tmp_path, broker, pki.ca), 3.5)
    finally:
        broker.stop()
    _assert_named_once(mqtt_log, "TLS certificate verification failed", "expired")


def test_plain_unreachable_is_still_called_unreachable(tmp_path: Path, mqtt_log: pytest.LogCaptureFixture) -> None:
    offline = Broker(tmp_path / "offline")  # configured, never started: connection refused
    cfg = MqttConfig.model_validate({"host": offline.host, "port": offline.port, "device_id": "dev1",
                                     "reconnect_max_s": 1.0, "keepalive_s": 5})  # fmt: skip
    link = MqttLink(cfg, Spool(tmp_path / "s.db"))
    _run_failing(link, 3.0)
    lines = [r.getMessage() for r in _mqtt_lines(mqtt_log, logging.WARNING)]
    assert len([m for m in lines if "unreachable" in m and "Connection refused" in m]) == 1, lines
    assert not any("Client is not connected" in r.getMessage() for r in mqtt_log.records)
