"""Integration fixtures: the runtime as a real subprocess against a real mosquitto, on the tiny real bundle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from tests.mqtt_broker import Broker, Collector, mosquitto_missing

REPO = Path(__file__).resolve().parents[2]


def rdedge_cmd() -> list[str]:
    """The installed ``rdedge`` console script next to this interpreter, else ``python -m export.cli``."""
    script = Path(sys.executable).parent / "rdedge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "export.cli"]


def make_folder(path: Path, n: int, size: tuple[int, int] = (72, 96), seed: int = 0) -> Path:
    """``n`` random BGR PNG images (H, W = ``size``), named in order."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(path / f"{i:04d}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return path


def make_video(path: Path, n: int, size: tuple[int, int] = (72, 96), seed: int = 1) -> Path:
    """An MJPG ``.avi`` with ``n`` random frames, written with ``cv2.VideoWriter``."""
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert w.isOpened(), "cv2.VideoWriter cannot write MJPG here"
    for _ in range(n):
        w.write(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    w.release()
    return path


def write_config(path: Path, bundle: Path, broker: Broker | None, spool: Path, cameras: list[dict[str, Any]],
                 **mqtt: Any) -> Path:  # fmt: skip
    """A runtime config YAML with fast test timings."""
    doc: dict[str, Any] = {"bundle": str(bundle), "cameras": cameras, "spool": {"path": str(spool)}}
    if broker is not None:
        doc["mqtt"] = {"host": broker.host, "port": broker.port, "device_id": "dev1", "topic_prefix": "t",
                       "reconnect_max_s": 1.0, "keepalive_s": 5, "stats_interval_s": 0.5, **mqtt}  # fmt: skip
    else:
        doc["mqtt"] = None
    path.write_text(yaml.safe_dump(doc))
    return path


class Runtime:
    """``rdedge run --config FILE`` as a subprocess; stderr goes to a file for assertions."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*rdedge_cmd(), "run", "--config", str(config)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    """Collects started runtimes and kills leftovers after the test."""
    started: list[Runtime] = []
    yield started
    for r in started:
        r.kill()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto on a free loopback port; persistence on so a session-holding Collector survives restarts."""
    why = mosquitto_missing()
    if why:
        pytest.skip(why)
    b = Broker(tmp_path / "broker", persistence=True)
    b.start()
    yield b
    b.stop()


def results(col: Collector, camera: str = "cam1") -> list[dict[str, Any]]:
    """Parsed result documents received so far (every payload must be valid JSON)."""
    return [json.loads(p) for p in col.on(f"/{camera}/result")]


def scored_in_log(log: str) -> int:
    """Frames the runtime scored, from its summary line (paced sources may drop frames under load)."""
    m = re.search(r"summary: (\d+) frame\(s\) scored", log)
    assert m, f"no summary line in the runtime log:\n{log[-3000:]}"
    return int(m.group(1))


def wait_until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
