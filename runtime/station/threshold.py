"""The threshold override sidecar: ``<ui.state_dir>/threshold.json``, written atomically, picked up without restart.

``{"threshold": 0.123, "by": "alice", "ts": 1764650000.0, "model_id": "..."}``. At start-up a valid sidecar
overrides ``threshold:`` of the config and the bundle's (only for the model id it names: after a hot swap to another
model it is ignored); while the service runs, :class:`SidecarWatcher` polls the file and hands each new
value to the service, which applies it between two frames (:meth:`runtime.service.Service.call_between_frames`).
A sidecar that does not parse is logged and ignored: the threshold in force stays.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.station.archive import atomic_write

log = logging.getLogger(__name__)

POLL_S = 0.5


class SidecarError(ValueError):
    """The sidecar file is unreadable or its threshold invalid; the message names the file."""


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's document, ``None`` when there is none; raises :class:`SidecarError` when it is invalid."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarError(f"{path}: unreadable: {exc}") from None
    try:
        doc = json.loads(raw)
        value = float(doc["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SidecarError(f"{path}: threshold: not a JSON object with a numeric 'threshold' ({exc})") from None
    if not math.isfinite(value):
        raise SidecarError(f"{path}: threshold: must be finite, got {value}")
    doc["threshold"] = value
    return dict(doc)


def write_sidecar(path: Path, value: float, user: str, model_id: str | None = None) -> dict[str, Any]:
    """Write a new override for ``model_id`` atomically (temporary file, fsync, rename); returns the document."""
    if not math.isfinite(value):
        raise SidecarError(f"threshold must be finite, got {value}")
    doc = {"threshold": float(value), "by": user, "ts": round(time.time(), 6), "model_id": model_id}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc).encode())
    return doc


class SidecarWatcher:
    """Poll the sidecar every ``POLL_S`` and call ``on_change(doc)`` when its content changes."""

    def __init__(self, path: Path, on_change: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self.on_change = on_change
        self._last: bytes | None = self._read_raw()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="station-threshold", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            raw = self._read_raw()
            if raw is None or raw == self._last:
                continue
            self._last = raw
            try:
                doc = read_sidecar(self.path)
            except SidecarError as exc:
                log.error("threshold override ignored: %s", exc)
                continue
            if doc is not None:
                self.on_change(doc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
