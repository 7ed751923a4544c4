"""OPC UA server: a real asyncua client logs in, subscribes to ResultReady and checks every verdict of a run."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.config import RuntimeConfig, parse_config
from runtime.errors import ConfigError
from runtime.outputs import Output, VerdictEvent
from runtime.service import Service
from tests.mqtt_broker import free_port

pytest.importorskip("asyncua")

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.cert_gen import setup_self_signed_certificate  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

NS = "urn:rdedge:machinevision"


class Recorder(Output):
    """What the service handed to its outputs: the reference the OPC UA events are checked against."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[VerdictEvent] = []

    def on_verdict(self, event: VerdictEvent) -> None:
        self.events.append(event)


def _cfg(tmp_path: Path, bundle: Path, port: int, **opcua: Any) -> RuntimeConfig:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(4):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    src = {"kind": "folder", "path": str(folder), "loop": True}
    ocfg = {"enabled": True, "port": port, "cert_dir": str(tmp_path / "pki"),
            "users": [{"name": "line1", "password_env": "RDEDGE_TEST_OPCUA_PW"}], **opcua}  # fmt: skip
    return parse_config({
        "bundle": str(bundle), "mqtt": None,
        "cameras": [{"name": "cam1", "mode": "triggered", "source": src, "max_fps": 50}],
        "opcua": ocfg,
    })  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("opcua")


@pytest.fixture(scope="module")
def service(pki: Path, tiny_bundle: Path) -> Iterator[tuple[Service, Recorder, str]]:
    """One server for the module: asyncua loads its standard address space in ~5 s on a loaded 2-core box."""
    os.environ["RDEDGE_TEST_OPCUA_PW"] = "s3cret-pw"
    port = free_port()
    svc = Service(_cfg(pki, tiny_bundle, port), threading.Event())
    rec = Recorder()
    svc.outputs.append(rec)
    svc.open()
    t = threading.Thread(target=svc.loop, daemon=True)
    t.start()
    yield svc, rec, f"opc.tcp://127.0.0.1:{port}/rdedge/"
    svc.stop.set()
    t.join(5)
    svc.close(ended=False)
    del os.environ["RDEDGE_TEST_OPCUA_PW"]


class Handler:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def event_notification(self, event: Any) -> None:
        self.events.append(event)


async def _run_triggers(url: str, n: int) -> tuple[list[Any], dict[str, Any]]:
    client = Client(url)
    client.set_user("line1")
    client.set_password("s3cret-pw")
    async with client:
        idx = await client.get_namespace_index(NS)
        vs = await client.nodes.objects.get_child(f"{idx}:VisionSystem")
        etype = await client.nodes.base_event_type.get_child(f"{idx}:ResultReadyEventType")
        handler = Handler()
        sub = await client.create_subscription(20, handler)
        await sub.subscribe_events(vs, etype, queuesize=1000)
        await asyncio.sleep(0.3)
        for i in range(n):
            ok = await vs.call_method(f"{idx}:Trigger", "cam1", f"plc-{i}")
            assert ok is True
            await asyncio.sleep(0.03)
        deadline = time.monotonic() + 15
        while len(handler.events) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await vs.call_method(f"{idx}:Trigger", "nope", "x") is False
        refused = await vs.call_method(f"{idx}:SelectRecipe", "other-bundle")
        assert refused.startswith("refused: recipe selection needs the station")
        await asyncio.sleep(STATE_WAIT)
        result = await vs.get_child([f"{idx}:Cameras", f"{idx}:cam1", f"{idx}:Result"])
        last = {f: await (await result.get_child(f"{idx}:{f}")).read_value() for f in ("Seq", "Verdict", "TriggerId")}
        last["SystemState"] = await (await vs.get_child(f"{idx}:SystemState")).read_value()
        counters = await vs.get_child(f"{idx}:Counters")
        last["FramesScored"] = await (await counters.get_child(f"{idx}:FramesScored")).read_value()
        await sub.delete()
    return handler.events, last


STATE_WAIT = 0.7  # > STATE_PERIOD_S: counters and state are written every 0.5 s


def test_password_client_receives_every_verdict_with_the_right_values(service: tuple[Service, Recorder, str]) -> None:
    svc, rec, url = service
    n = 30
    events, last = asyncio.run(_run_triggers(url, n))
    assert len(rec.events) == n  # the first test of the module: nothing was triggered before
    assert len(events) == n, f"{len(events)} events for {n} verdicts"
    for got, want in zip(events, rec.events, strict=True):
        assert got.Camera == "cam1" and got.Seq == want.seq and got.FrameSeq == want.frame_seq
        assert got.Verdict == ("NG" if want.is_ng else "OK") and got.IsNg == want.is_ng
        assert got.Score == pytest.approx(want.score, abs=0) and got.Threshold == want.threshold
        assert got.ModelId == want.model_id == svc.model.model_id  # type: ignore[union-attr]
        assert got.TriggerId == want.trigger_id
    assert [e.TriggerId for e in events] == [f"plc-{i}" for i in range(n)]
    assert last["Seq"] == rec.events[-1].seq and last["TriggerId"] == f"plc-{n - 1}"
    assert last["SystemState"] == "Operational" and last["FramesScored"] == n
    st = svc.stats()["outputs"]["opcua"]
    assert st["state"] == "up" and st["events"] == n and st["events_dropped"] == 0


async def _login(url: str, user: str | None, password: str | None) -> None:
    client = Client(url)
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    async with client:
        await client.nodes.objects.read_browse_name()


def test_wrong_password_and_anonymous_are_refused(service: tuple[Service, Recorder, str]) -> None:
    svc, _rec, url = service
    with pytest.raises(ua.UaStatusCodeError) as exc:
        asyncio.run(_login(url, "line1", "wrong"))
    assert exc.value.code == ua.StatusCodes.BadUserAccessDenied
    with pytest.raises(ua.UaStatusCodeError):
        asyncio.run(_login(url, "nobody", "s3cret-pw"))
    with pytest.raises(ua.UaStatusCodeError) as exc:
        asyncio.run(_login(url, None, None))
    assert exc.value.code == ua.StatusCodes.BadIdentityTokenRejected
    assert svc.stats()["outputs"]["opcua"]["refused_logins"] == 2
    asyncio.run(_login(url, "line1", "s3cret-pw"))  # still serving


def test_basic256sha256_with_the_certificate_made_on_first_start(
    service: tuple[Service, Recorder, str], pki: Path, tmp_path: Path
) -> None:
    svc, _rec, url = service
    server_cert = pki / "pki" / "server_cert.der"
    assert server_cert.is_file() and (pki / "pki" / "server_key.pem").stat().st_mode & 0o077 == 0
    ckey, ccert = tmp_path / "client_key.pem", tmp_path / "client_cert.der"

    async def go() -> str:
        await setup_self_signed_certificate(ckey, ccert, "urn:test:plc", "localhost",
                                            [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "plc"})  # fmt: skip
        client = Client(url)
        client.application_uri = "urn:test:plc"
        client.set_user("line1")
        client.set_password("s3cret-pw")
        await client.set_security(SecurityPolicyBasic256Sha256, str(ccert), str(ckey),
                                  server_certificate=str(server_cert),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)  # fmt: skip
        async with client:
            idx = await client.get_namespace_index(NS)
            vs = await client.nodes.objects.get_child(f"{idx}:VisionSystem")
            return str(await (await vs.get_child(f"{idx}:SystemState")).read_value())

    assert asyncio.run(go()) in ("Operational", "Preoperational")


def test_anonymous_only_when_configured_and_users_need_a_password(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RDEDGE_TEST_OPCUA_PW", raising=False)
    with pytest.raises(ConfigError, match="no user can log in"):
        _cfg(tmp_path, tiny_bundle, 4840, users=[])
    cfg = _cfg(tmp_path, tiny_bundle, 4840)
    from runtime.outputs.opcua import OpcUaOutput

    with pytest.raises(ConfigError, match=r"opcua.users.0: no password for user 'line1'"):
        OpcUaOutput(cfg)
    port = free_port()
    svc = Service(_cfg(tmp_path, tiny_bundle, port, users=[], allow_anonymous=True), threading.Event())
    svc.open()
    try:
        asyncio.run(_login(f"opc.tcp://127.0.0.1:{port}/rdedge/", None, None))
    finally:
        svc.stop.set()
        svc.close(ended=False)
