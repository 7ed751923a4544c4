"""Service logging: JSON lines or text on stderr at the configured level."""

from __future__ import annotations

import json
import logging

import pytest

from runtime.config import LoggingConfig
from runtime.logsetup import setup_logging


@pytest.fixture(autouse=True)
def _restore_root() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="WARNING", json_lines=True))
    logging.getLogger("runtime.x").info("hidden")
    logging.getLogger("runtime.x").warning("camera %s down", "cam1")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "WARNING" and doc["logger"] == "runtime.x" and doc["msg"] == "camera cam1 down"


def test_text_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="ERROR"), verbose=True)
    logging.getLogger("runtime.y").debug("details")
    assert "DEBUG runtime.y: details" in capsys.readouterr().err
