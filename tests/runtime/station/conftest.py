"""A real running service with the station page: tiny ONNX bundle, looping folder camera, real mosquitto, uvicorn."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from runtime.config import RuntimeConfig, parse_config
from runtime.service import run_service
from tests.mqtt_broker import Broker, Collector, free_port, mosquitto_missing

PASSWORDS = {"olga": "operator-pw-1", "erik": "engineer-pw-1", "ada": "admin-pw-123", "rita": "rate-limit-pw"}
ROLES = {"olga": "operator", "erik": "engineer", "ada": "admin", "rita": "operator"}


@dataclass
class RunningStation:
    url: str
    cfg: RuntimeConfig
    root: Path
    broker: Broker
    mqtt: Collector
    stop: threading.Event
    thread: threading.Thread

    @contextlib.contextmanager
    def client(self, user: str | None = None) -> Iterator[httpx.Client]:
        """An httpx client, logged in as ``user`` (CSRF header set) when given."""
        with httpx.Client(base_url=self.url, timeout=10) as c:
            if user is not None:
                r = c.post("/api/login", json={"user": user, "password": PASSWORDS[user]})
                assert r.status_code == 200, r.text
                c.headers["X-CSRF-Token"] = r.json()["csrf"]
            yield c

    def wait(self, pred: object, timeout: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _images(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        cv2.circle(img, (64, 48), 10 + 2 * i, (255, 255, 255), -1)  # something a person can see change
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def start_station(root: Path, bundle: Path, max_fps: float = 8, **ui: object) -> RunningStation:
    """Start broker + service (station enabled) in a thread; returns once the page answers."""
    why = mosquitto_missing()
    if why:
        pytest.skip(why)
    broker = Broker(root / "broker").start()
    port = free_port()
    ui_cfg = {"enabled": True, "port": port, "state_dir": str(root / "state"), "live_fps": 5,
              "archive": {"dir": str(root / "archive"), "good_dir": str(root / "good"),
                          "labelled_dir": str(root / "labelled"), "borderline_margin": 0.2}, **ui}  # fmt: skip
    cfg = parse_config({
        "bundle": str(bundle),
        "cameras": [{"name": "cam1", "source": {"kind": "folder", "path": str(_images(root / "frames")), "loop": True},
                     "max_fps": max_fps}],
        "mqtt": {"host": broker.host, "port": broker.port, "device_id": "line1", "stats_interval_s": 1},
        "spool": {"path": str(root / "spool.sqlite3"), "min_free_mb": 0},
        "ui": ui_cfg,
    })  # fmt: skip
    from runtime.station.auth import UserStore

    users = UserStore(cfg.ui.state_dir / "users.sqlite3")
    for name, pw in PASSWORDS.items():
        users.add(name, ROLES[name], pw)
    users.close()
    mqtt = Collector(broker, ["rdedge/line1/#"])
    stop = threading.Event()
    t = threading.Thread(target=run_service, args=(cfg, stop), name="service", daemon=True)
    t.start()
    st = RunningStation(f"http://127.0.0.1:{port}", cfg, root, broker, mqtt, stop, t)

    def up() -> bool:
        try:
            return httpx.get(st.url + "/login", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    st.wait(up, 30, "the station page")
    return st


def stop_station(st: RunningStation) -> None:
    st.stop.set()
    st.thread.join(15)
    st.mqtt.close()
    st.broker.stop()
    assert not st.thread.is_alive(), "service did not stop"


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[RunningStation]:
    st = start_station(tmp_path_factory.mktemp("station"), tiny_bundle)
    yield st
    stop_station(st)
