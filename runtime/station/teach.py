"""Teach mode: collect N good frames of a camera into a data set, then train + export on this box or a workstation.

Collecting: the engineer puts good parts through the camera; :meth:`Teach.on_verdict` (scoring thread) hands at
most one frame per ``interval_s`` to a writer thread through a bounded queue (drops counted), which writes
``<teach_dir>/<name>/train/good/<n>.png`` (MVTec layout: ``rdedge train --data <teach_dir>/<name>`` reads it).

Training on this box runs ``rdedge train`` then ``rdedge export`` as child processes at the lowest CPU priority
(``nice 19``) so scoring keeps its cores; the exported bundle lands in the swap folder (``ui.bundles_dir``) and is
swapped in from the model page like any other. Progress: the phase and the child's log (``teach.log``). Needs the
``rdedge[export]`` extra (torch) on the box; without it the page shows the commands to run on a workstation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2

from runtime.outputs import VerdictEvent

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_FRAMES = 10_000


class TeachError(ValueError):
    """A teach request that cannot be served; the message says why."""


def _rdedge() -> str:
    exe = Path(sys.executable).with_name("rdedge")
    return str(exe) if exe.exists() else "rdedge"


class Teach:
    """Teach mode of one station.

    Args:
        teach_dir: where data sets and training runs go.
        bundles_dir: where an on-box export writes its bundle (the swap folder).
        image_size: training image side, pixels.
        steps: training steps.
    """

    def __init__(self, teach_dir: Path, bundles_dir: Path, image_size: int, steps: int) -> None:
        self.teach_dir = teach_dir
        self.bundles_dir = bundles_dir
        self.image_size = image_size
        self.steps = steps
        self.state = "idle"  # idle | collecting | collected | training | exported | failed
        self.name: str | None = None
        self.camera: str | None = None
        self.target = 0
        self.collected = 0
        self.dropped = 0
        self.interval_s = 0.0
        self.error: str | None = None
        self.phase: str | None = None
        self.started: float | None = None
        self._last_take = 0.0
        self._q: queue.Queue[VerdictEvent | None] = queue.Queue(maxsize=8)
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._trainer: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def dataset(self, name: str) -> Path:
        return self.teach_dir / name

    # -- collecting --------------------------------------------------------------------------------------------------

    def collect(self, camera: str, n: int, name: str, interval_s: float) -> None:
        """Start collecting ``n`` frames of ``camera`` into data set ``name`` (a new folder)."""
        if not NAME_RE.match(name):
            raise TeachError(f"name {name!r}: letters, digits, '_' and '-' (1-64), starting with a letter or digit")
        if not 1 <= n <= MAX_FRAMES:
            raise TeachError(f"n must be in 1..{MAX_FRAMES}, got {n}")
        with self._lock:
            if self.state in ("collecting", "training"):
                raise TeachError(f"teach mode is busy ({self.state} {self.name})")
            good = self.dataset(name) / "train" / "good"
            if good.exists() and any(good.iterdir()):
                raise TeachError(f"data set {name!r} already exists ({good}); pick another name")
            good.mkdir(parents=True, exist_ok=True)
            self.name, self.camera, self.target, self.interval_s = name, camera, n, interval_s
            self.collected = self.dropped = 0
            self.error = self.phase = None
            self.started = time.time()
            self._last_take = 0.0
            self.state = "collecting"
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="station-teach", daemon=True)
            self._writer.start()
        log.info("teach: collecting %d frame(s) of camera %s into %s", n, camera, good)

    def cancel(self) -> None:
        with self._lock:
            if self.state == "collecting":
                self.state = "idle"
                self.error = f"cancelled after {self.collected} frame(s)"
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def on_verdict(self, ev: VerdictEvent) -> None:
        """Scoring thread: take this frame if collecting from its camera and the interval has passed."""
        if self.state != "collecting" or ev.camera != self.camera or ev.ts - self._last_take < self.interval_s:
            return
        self._last_take = ev.ts
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            self.dropped += 1

    def _write_loop(self) -> None:
        from runtime.preprocess import to_uint8

        while True:
            ev = self._q.get()
            if ev is None:
                return
            with self._lock:
                if self.state != "collecting" or self.name is None:
                    continue
                i = self.collected
                path = self.dataset(self.name) / "train" / "good" / f"{i:05d}.png"
            try:
                ok, png = cv2.imencode(".png", to_uint8(ev.image), [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if not ok:
                    raise ValueError(f"cannot encode a frame of shape {ev.image.shape}")
                path.write_bytes(png.tobytes())
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.state, self.error = "failed", f"{path}: {exc}"
                log.error("teach: %s", self.error)
                continue
            with self._lock:
                self.collected += 1
                if self.collected >= self.target and self.state == "collecting":
                    self.state = "collected"
                    log.info("teach: %d frame(s) collected in %s", self.collected, path.parent)

    # -- training ----------------------------------------------------------------------------------------------------

    def commands(self, name: str | None = None) -> list[str]:
        """The train + export commands for data set ``name`` (on this box; on a workstation after copying it)."""
        name = name or self.name or "NAME"
        data, run, bundle = self.dataset(name), self.teach_dir / "runs" / name, self.bundles_dir / name
        rd = _rdedge()
        return [
            f"{rd} train --data {shlex.quote(str(data))} --out {shlex.quote(str(run))} "
            f"--image-size {self.image_size} --steps {self.steps} --no-progress",
            f"{rd} export --run {shlex.quote(str(run))} --out {shlex.quote(str(bundle))} --fused",
        ]

    def train(self) -> None:
        """Run train then export at nice 19 on a worker thread (data set collected first)."""
        with self._lock:
            if self.state not in ("collected", "exported", "failed") or self.name is None or not self.collected:
                raise TeachError(f"collect frames first (teach mode is {self.state})")
            if (self.bundles_dir / self.name).exists():
                raise TeachError(f"bundle {self.bundles_dir / self.name} already exists")
            self.state, self.error, self.phase = "training", None, "train"
        self._trainer = threading.Thread(target=self._train_loop, args=(self.name,), name="station-train", daemon=True)
        self._trainer.start()

    def _train_loop(self, name: str) -> None:
        logfile = self.dataset(name) / "teach.log"
        with open(logfile, "ab") as out:
            for phase, cmd in zip(("train", "export"), self.commands(name), strict=True):
                self.phase = phase
                out.write(f"$ {cmd}\n".encode())
                out.flush()
                try:
                    self._proc = subprocess.Popen(shlex.split(cmd), stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))  # fmt: skip
                    rc = self._proc.wait()
                except OSError as exc:
                    rc, msg = -1, str(exc)
                else:
                    msg = f"exit status {rc} (see {logfile})"
                if rc != 0:
                    with self._lock:
                        self.state, self.error = "failed", f"{phase}: {msg}"
                    log.error("teach: %s", self.error)
                    return
        with self._lock:
            self.state, self.phase = "exported", None
        log.info("teach: bundle %s exported; swap it in from the model page", self.bundles_dir / name)

    def log_tail(self, lines: int = 15) -> str:
        if self.name is None:
            return ""
        p = self.dataset(self.name) / "teach.log"
        with contextlib.suppress(OSError):
            return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "name": self.name, "camera": self.camera, "target": self.target,
                    "collected": self.collected, "dropped": self.dropped, "error": self.error, "phase": self.phase,
                    "dataset": str(self.dataset(self.name)) if self.name else None,
                    "bundle": str(self.bundles_dir / self.name) if self.name else None,
                    "commands": self.commands() if self.name else [], "log": self.log_tail()}  # fmt: skip

    def close(self) -> None:
        self.cancel()
        if self._writer is not None:
            with contextlib.suppress(queue.Full):
                self._q.put(None, timeout=1)
            self._writer.join(timeout=2)
