"""Suite-wide pytest set-up: GPU tests skip cleanly without CUDA; shared fixtures (tiny bundle, real broker)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fixtures import tiny_bundle  # noqa: F401  (pytest finds the fixture by name)
from tests.mqtt_broker import Broker, mosquitto_missing


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain-TCP anonymous mosquitto on a free loopback port (skips when mosquitto is not installed)."""
    why = mosquitto_missing()
    if why:
        pytest.skip(why)
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def _has_cuda() -> bool:
    if os.environ.get("RDEDGE_NO_GPU"):
        return False
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for tests
            return False
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
