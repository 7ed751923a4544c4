"""Fixtures for runtime unit tests: the tiny real bundle and a real mosquitto broker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.*` helpers import from the repo root; plain `pytest` (unlike `python -m pytest`) does not put it on sys.path
# (a root conftest.py or `pythonpath = ["."]` in pyproject would make this unnecessary).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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
