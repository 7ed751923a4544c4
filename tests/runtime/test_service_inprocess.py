"""run_service embedded in-process: no MQTT (verdicts only logged), and stop_event from another thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.config import parse_config
from runtime.service import run_service


def _folder(path: Path, n: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        cv2.imwrite(str(path / f"{i:03d}.png"), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    return path


def test_without_mqtt_scores_every_frame_and_returns_0(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = {"kind": "folder", "path": str(_folder(tmp_path / "i", 6))}
    spool = {"path": str(tmp_path / "s.db")}
    cfg = parse_config(
        {"bundle": str(tiny_bundle), "mqtt": None, "spool": spool, "cameras": [{"name": "c", "source": src}]}
    )
    caplog.set_level(logging.INFO, logger="runtime.service")
    assert run_service(cfg) == 0
    assert "summary: 6 frame(s) scored" in caplog.text
    assert not (tmp_path / "s.db").exists()  # no broker, no spool


def test_stop_event_stops_a_looping_source_quickly(tmp_path: Path, tiny_bundle: Path) -> None:
    src = {"kind": "folder", "path": str(_folder(tmp_path / "i", 3)), "loop": True}
    cfg = parse_config({"bundle": str(tiny_bundle), "mqtt": None, "cameras": [{"name": "c", "source": src}]})
    stop = threading.Event()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(run_service(cfg, stop)))
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and rc == [0]
    assert time.monotonic() - t0 < 3.0
