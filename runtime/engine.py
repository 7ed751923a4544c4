"""The model as the service sees it: frame in, :class:`Prediction` out.

:class:`AnomalyModel` loads and verifies a bundle, builds the :class:`~runtime.preprocess.Preprocessor` from the
manifest and the backend from the config. Constructing it imports no torch and costs one session (or engine) load
per part.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from runtime.backends.base import Backend, create_backend
from runtime.bundle import Manifest, load_manifest
from runtime.config import BackendConfig, RoiConfig
from runtime.preprocess import Preprocessor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One frame's verdict.

    Attributes:
        score: image anomaly score (max of the smoothed map), model units; NG when ``>= threshold``.
        anomaly_map: ``(H, W)`` float32 per-pixel anomaly at the model's input resolution (of the ROI if any).
        is_ng: ``score >= threshold``.
        timings_ms: ``"preprocess"``, one key per backend stage (part names, ``"fused"`` or ``"cuda_graph"``) and
            ``"total"`` (preprocess + inference + host copies), in milliseconds.
    """

    score: float
    anomaly_map: np.ndarray = field(repr=False)
    is_ng: bool
    timings_ms: dict[str, float]


class AnomalyModel:
    """A loaded bundle ready to score frames.

    Args:
        bundle_dir: bundle directory (``manifest.json`` + ONNX parts, optional engines).
        backend: which backend runs it and how.
        verify: check every file's sha256 against the manifest before loading (a tampered bundle raises).
        threshold: override the manifest's calibrated threshold (score units).

    Raises:
        BundleError: missing/corrupt/tampered bundle, or engines not built for this device.
        MissingExtraError: the backend's package is not installed.
    """

    def __init__(
        self, bundle_dir: Path, backend: BackendConfig, verify: bool = True, threshold: float | None = None
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self._manifest = load_manifest(self.bundle_dir, verify=verify)
        self._threshold = float(threshold) if threshold is not None else self._manifest.threshold.value
        self._pre = Preprocessor(self._manifest.preprocess, self._manifest.input)
        self._input_name = self._manifest.input.name
        self._backend: Backend | None = create_backend(self.bundle_dir, self._manifest, backend)
        self.backend_config = backend
        logger.info(
            "model %s loaded from %s (%s, threshold %.6g%s)",
            self.model_id,
            self.bundle_dir,
            backend.kind,
            self._threshold,
            " override" if threshold is not None else "",
        )

    @property
    def manifest(self) -> Manifest:
        """The bundle's validated manifest."""
        return self._manifest

    @property
    def model_id(self) -> str:
        """``manifest.model_id``."""
        return self._manifest.model_id

    @property
    def threshold(self) -> float:
        """NG threshold in score units: the override if given, else ``manifest.threshold.value``."""
        return self._threshold

    @property
    def backend(self) -> Backend:
        """The running backend (raises ``RuntimeError`` after :meth:`close`)."""
        if self._backend is None:
            raise RuntimeError("AnomalyModel is closed")
        return self._backend

    def predict(self, frame: np.ndarray, roi: RoiConfig | None = None) -> Prediction:
        """Score one frame.

        Args:
            frame: uint8 BGR ``(H, W, 3)``, BGRA, grey ``(H, W)``/``(H, W, 1)`` or uint16 (see Preprocessor).
            roi: crop in source pixels before resizing.

        Returns:
            The :class:`Prediction`; ``anomaly_map`` is ``(input.height, input.width)`` float32.

        Raises:
            ValueError: unsupported frame or a ROI outside it.
        """
        backend = self.backend
        t0 = time.perf_counter()
        x = self._pre(frame, roi=roi)
        t1 = time.perf_counter()
        outputs, stage_ms = backend.run({self._input_name: x})
        score = float(outputs["score"][0])
        amap = np.ascontiguousarray(outputs["anomaly_map"][0, 0], dtype=np.float32)
        t2 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, **stage_ms, "total": (t2 - t0) * 1e3}
        return Prediction(score=score, anomaly_map=amap, is_ng=score >= self._threshold, timings_ms=timings)

    def warmup(self, n: int = 2) -> None:
        """Run ``n`` predictions on a mid-grey frame so first-call allocations happen before real frames."""
        frame = np.full((self._manifest.input.height, self._manifest.input.width, 3), 128, dtype=np.uint8)
        for _ in range(n):
            self.predict(frame)

    def close(self) -> None:
        """Release the backend. Idempotent."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> AnomalyModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
