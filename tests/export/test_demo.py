"""Pieces of ``rdedge demo``: options, the replayed-camera folder, and publishing through the real runtime service
to a real mosquitto broker (the full demo trains for minutes, so it is run by hand / the contract script)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.demo import make_camera_folder, parse_hostport, publish_through_service
from export.errors import ExportError
from tests.mqtt_broker import Broker


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_hostport("[::1]:8883") == ("::1", 8883)
    for bad in ("localhost", ":1883", "host:0", "host:x"):
        with pytest.raises(ExportError, match="HOST:PORT"):
            parse_hostport(bad)


def test_camera_folder_names_carry_the_truth(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    truth = make_camera_folder(tiny_run[1], tmp_path / "camera")
    assert len(truth) == 4 + 4 * 2
    assert sorted(p.name for p in (tmp_path / "camera").iterdir()) == sorted(truth)
    assert all(name.startswith(t + "_") for name, t in truth.items())


def test_service_publishes_every_replayed_frame(
    broker: Broker, exported_bundle: Path, tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("runtime.service")
    truth = make_camera_folder(tiny_run[1], tmp_path / "camera")
    received = publish_through_service(
        exported_bundle, tmp_path / "camera", tmp_path, ("127.0.0.1", broker.port), 2, len(truth)
    )
    assert received == len(truth)
