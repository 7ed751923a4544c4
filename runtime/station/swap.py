"""Model hot swap: load and verify a bundle off the scoring thread, swap it in between two frames, roll back.

A swap: (1) on a worker thread, :class:`~runtime.engine.AnomalyModel` loads the bundle with ``verify=True`` (the
manifest signature under ``trusted_keys``, the sha256 of every file, the calibration frames' scores) and scores one
warm-up frame; (2) the scoring thread replaces ``service.model`` before its next frame
(:meth:`~runtime.service.Service.call_between_frames`): the frame in flight finishes on the old model, the next
one is scored by the new one, nothing is dropped or scored twice and ``seq`` (the spool's) just continues, while
``model_id`` in the verdicts changes at that frame; (3) the old model is closed on the worker thread, the previous
bundle is remembered for one-click rollback (``<state_dir>/active_bundle.json``, also read at start-up so a restart
keeps the swapped-in bundle), an audit entry is written and ``<prefix>/<device>/model`` is published retained.
A bundle that fails verification is refused: the running model is untouched.

After a swap the new bundle's own calibrated threshold is in force: a threshold override (sidecar) made for another
model id is ignored, since scores of two models are not on one scale.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.bundle import load_manifest
from runtime.engine import AnomalyModel
from runtime.errors import RdedgeError
from runtime.spool import OutMessage
from runtime.station.archive import atomic_write

if TYPE_CHECKING:
    from runtime.service import Service

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SWAP_TIMEOUT_S = 30.0


class SwapError(ValueError):
    """A swap request that cannot be served (unknown bundle, one already running); the message says why."""


class ModelSwapper:
    """Hot swap and rollback of the service's model.

    Args:
        service: the running service (its ``model`` is replaced).
        bundles_dir: folder whose sub-folders are the bundles offered for a swap.
        state_path: JSON file remembering the active and the previous bundle.
        on_swapped: called on the worker thread after each swap as ``on_swapped(old_model_id, new_model, user)``.
        on_refused: called when a bundle fails to load or verify as ``on_refused(user, bundle, reason)``.
    """

    def __init__(
        self,
        service: Service,
        bundles_dir: Path,
        state_path: Path,
        on_swapped: Callable[[str, AnomalyModel, str], None] | None = None,
        on_refused: Callable[[str, Path, str], None] | None = None,
    ) -> None:
        self.service = service
        self.bundles_dir = bundles_dir
        self.state_path = state_path
        self.on_swapped = on_swapped
        self.on_refused = on_refused
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.previous: Path | None = None
        self.state = "idle"
        self.last_error: str | None = None
        self.swaps = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- listing -----------------------------------------------------------------------------------------------------

    def bundles(self) -> list[dict[str, Any]]:
        """The bundles offered: name, model id, threshold, input size; unreadable ones with their error."""
        out = []
        for d in sorted(p for p in self.bundles_dir.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
            if not (d / "manifest.json").is_file():
                continue
            try:
                m = load_manifest(d, verify=False)
                out.append({"name": d.name, "model_id": m.model_id, "threshold": m.threshold.value,
                            "input": f"{m.input.width}x{m.input.height}"})  # fmt: skip
            except RdedgeError as exc:
                out.append({"name": d.name, "error": str(exc)})
        return out

    def resolve(self, name: str) -> Path:
        """The folder of an offered bundle; :class:`SwapError` for anything else (no path is built from input)."""
        if NAME_RE.match(name):
            for b in self.bundles():
                if b["name"] == name:
                    return self.bundles_dir / name
        raise SwapError(f"no bundle {name!r} in {self.bundles_dir}")

    def status(self) -> dict[str, Any]:
        model = self.service.model
        return {"model_id": model.model_id if model else None, "bundle": str(model.bundle_dir) if model else None,
                "previous": str(self.previous) if self.previous else None, "state": self.state,
                "last_error": self.last_error, "swaps": self.swaps}  # fmt: skip

    # -- start-up ----------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Before the cameras start: load the bundle a previous run swapped in (if any and still valid)."""
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable, keeping the configured bundle: %s", self.state_path, exc)
            return
        svc = self.service
        assert svc.model is not None
        self.previous = Path(doc["previous"]) if doc.get("previous") else None
        active = Path(doc.get("bundle", ""))
        if active.resolve() == svc.model.bundle_dir.resolve():
            return
        try:
            new = self._load(active)
        except RdedgeError as exc:
            log.error("swapped-in bundle %s refused at start-up, keeping the configured %s: %s", active,
                      svc.model.bundle_dir, exc)  # fmt: skip
            return
        old = svc.model
        svc.model = new
        old.close()
        log.info("model %s from %s (swapped in by %s before the restart)", new.model_id, active, doc.get("by"))

    # -- swap --------------------------------------------------------------------------------------------------------

    def _load(self, bundle: Path) -> AnomalyModel:
        cfg = self.service.cfg
        model = AnomalyModel(bundle, cfg.backend, verify=True, trusted_keys=cfg.trusted_keys)
        try:
            model.warmup(1)
        except BaseException:
            model.close()
            raise
        return model

    def swap(self, bundle: Path, user: str) -> None:
        """Start swapping to ``bundle`` on a worker thread; :class:`SwapError` when a swap is already running."""
        with self._lock:
            if self.state != "idle":  # set back to idle as the worker's last step
                raise SwapError(f"a swap is already running ({self.state})")
            self.state = f"loading {bundle.name}"
            self.last_error = None
            self._thread = threading.Thread(target=self._run, args=(bundle, user), name="station-swap", daemon=True)
            self._thread.start()

    def rollback(self, user: str) -> Path:
        """Swap back to the previous bundle; :class:`SwapError` when there is none."""
        if self.previous is None:
            raise SwapError("no previous bundle to roll back to")
        self.swap(self.previous, user)
        return self.previous

    def wait(self, timeout: float = SWAP_TIMEOUT_S) -> bool:
        """Wait for the running swap (tests)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def _run(self, bundle: Path, user: str) -> None:
        try:
            self._swap(bundle, user)
        finally:
            self.state = "idle"

    def _swap(self, bundle: Path, user: str) -> None:
        svc = self.service
        t0 = time.monotonic()
        try:
            new = self._load(bundle)
        except Exception as exc:  # refused: the running model stays
            self.last_error = f"{bundle}: {exc}"
            log.error("model swap to %s refused: %s", bundle, exc)
            if self.on_refused is not None:
                self.on_refused(user, bundle, str(exc))
            return
        verified_ms = (time.monotonic() - t0) * 1e3
        self.state = f"swapping to {new.model_id}"
        box: dict[str, Any] = {}
        done = threading.Event()

        def between_frames() -> None:  # scoring thread: one attribute assignment
            box["old"] = svc.model
            svc.model = new
            box["at"] = time.monotonic()
            done.set()

        svc.call_between_frames(between_frames)
        while not done.wait(0.1):
            if svc.stop.is_set():
                new.close()
                self.last_error = "service stopping"
                return
        old: AnomalyModel = box["old"]
        old_id = old.model_id
        self.previous = old.bundle_dir
        old.close()
        self.swaps += 1
        doc = {"bundle": str(new.bundle_dir), "previous": str(self.previous), "model_id": new.model_id, "by": user,
               "ts": round(time.time(), 6)}  # fmt: skip
        try:
            atomic_write(self.state_path, json.dumps(doc).encode())
        except OSError as exc:
            log.error("%s: cannot remember the swap (a restart loads the configured bundle): %s", self.state_path, exc)
        log.info("model swap %s -> %s by %s (verified + warm-up %.0f ms; between frames %.1f ms after)", old_id,
                 new.model_id, user, verified_ms, (box["at"] - t0) * 1e3 - verified_ms)  # fmt: skip
        if self.on_swapped is not None:
            self.on_swapped(old_id, new, user)
        if svc.link is not None:
            body = {**doc, "previous_model_id": old_id, "verified_ms": round(verified_ms, 1)}
            svc.link.enqueue_plain([OutMessage(f"{svc.link.topics.base}/model", json.dumps(body).encode(), qos=1,
                                               retain=True)])  # fmt: skip
