"""The model as the service sees it: frame in, :class:`Prediction` out.

:class:`AnomalyModel` loads and verifies a bundle, builds the :class:`~runtime.preprocess.Preprocessor` from the
manifest and the backend from the config. Constructing it imports no torch and costs one session (or engine) load
per part, plus (with ``verify``) one prediction per calibration frame the bundle ships.

Load-time checks, in order: the signature of ``manifest.json`` when ``trusted_keys`` is given
(:mod:`runtime.signing`), the sha256 of every file, then the calibration frames: each is scored through this
runtime's preprocessing and backend and must reproduce the score export recorded within
``CALIB_REL_TOL * max|recorded| + CALIB_ABS_TOL``. Hashes catch accidents, the signature who made the bundle, and
the score check a bundle that no longer behaves as it did when it was exported (altered weights, a broken engine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from runtime.backends.base import Backend, create_backend
from runtime.bundle import Manifest, load_manifest
from runtime.config import BackendConfig, RoiConfig
from runtime.errors import BundleError
from runtime.preprocess import Preprocessor
from runtime.signing import PublicKey, load_public_key

logger = logging.getLogger(__name__)

#: Calibration check tolerance, relative to the largest recorded score: export's FP16 bound (observed ~1e-3 for
#: FP16 ONNX / TensorRT engines against the FP32 chain that recorded the scores).
CALIB_REL_TOL = 2e-2
#: Absolute floor of the tolerance (score units), for bundles whose scores are all near zero.
CALIB_ABS_TOL = 1e-6


@dataclass(frozen=True)
class CalibrationCheck:
    """Outcome of the load-time calibration check (it passed; a failure raises).

    Attributes:
        frames: calibration frames scored.
        max_abs_diff: largest ``|score - recorded|``, score units.
        tolerance: the bound it was held to, score units.
        ms: wall time of the check (preprocess + inference of every frame), milliseconds.
    """

    frames: int
    max_abs_diff: float
    tolerance: float
    ms: float


@dataclass(frozen=True)
class Prediction:
    """One frame's verdict.

    Attributes:
        score: image anomaly score (max of the smoothed map), model units; NG when ``>= threshold``.
        anomaly_map: ``(H, W)`` float32 per-pixel anomaly at the model's input resolution (of the ROI if any).
        is_ng: ``score >= threshold``.
        timings_ms: ``"preprocess"``, one key per backend stage (part names, ``"fused"`` or ``"cuda_graph"``),
            ``"classifier"`` when the bundle has one, and ``"total"`` (preprocess + inference + host copies), in
            milliseconds.
        probability: the bundle's classifier's calibrated defect probability in [0, 1] (``rdedge label-tune``), or
            ``None`` without one. With a classifier ``is_ng`` follows ``manifest.classifier.decision``.
    """

    score: float
    anomaly_map: np.ndarray = field(repr=False)
    is_ng: bool
    timings_ms: dict[str, float]
    probability: float | None = None


class AnomalyModel:
    """A loaded bundle ready to score frames.

    Args:
        bundle_dir: bundle directory (``manifest.json`` + ONNX parts, optional engines).
        backend: which backend runs it and how.
        verify: check every file's sha256 against the manifest before loading (a tampered bundle raises), and
            score the bundle's calibration frames (a bundle whose scores moved raises).
        threshold: override the manifest's calibrated threshold (score units).
        trusted_keys: ed25519 public keys (``.pub`` files or loaded keys); when given, a bundle not signed by one of
            them is refused, and the hashes are checked even with ``verify=False``.

    Raises:
        BundleError: missing/corrupt/tampered/unsigned bundle, scores that moved, or engines not built for this
            device.
        MissingExtraError: the backend's package (or PyNaCl, ``rdedge[sign]``, with ``trusted_keys``) is missing.
        RdedgeError: a trusted key file is missing or unreadable.
    """

    def __init__(
        self,
        bundle_dir: Path,
        backend: BackendConfig,
        verify: bool = True,
        threshold: float | None = None,
        trusted_keys: Sequence[PublicKey | str | Path] | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self._classifier: Any | None = None
        keys = [k if isinstance(k, PublicKey) else load_public_key(k) for k in trusted_keys or ()]
        self._manifest = load_manifest(self.bundle_dir, verify=verify, trusted_keys=keys)
        check_int8(self.bundle_dir, self._manifest, backend.allow_failed_int8)
        self._threshold = float(threshold) if threshold is not None else self._manifest.threshold.value
        self._pre = Preprocessor(self._manifest.preprocess, self._manifest.input)
        self._input_name = self._manifest.input.name
        self._backend: Backend | None = create_backend(self.bundle_dir, self._manifest, backend)
        self.backend_config = backend
        try:
            self._classifier = _load_classifier(self.bundle_dir, self._manifest, backend.threads)
        except BaseException:
            self.close()
            raise
        #: The calibration check's outcome; ``None`` when not run (``verify=False``, or no frames in the bundle).
        self.calibration: CalibrationCheck | None = None
        if verify:
            try:
                self._check_calibration()
            except BaseException:
                self.close()
                raise
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

    @threshold.setter
    def threshold(self, value: float) -> None:
        """Change the threshold; set it between frames (the service does so on its scoring thread)."""
        value = float(value)
        if not value == value or value in (float("inf"), float("-inf")):
            raise ValueError(f"threshold must be finite, got {value}")
        self._threshold = value

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
        is_ng = score >= self._threshold
        probability: float | None = None
        clf = self._manifest.classifier
        if self._classifier is not None and clf is not None:
            tc = time.perf_counter()
            feed = {"image": x, "anomaly_map": outputs["anomaly_map"][:1], "score": outputs["score"][:1]}
            probability = float(self._classifier.run(["probability"], feed)[0][0])
            stage_ms = {**stage_ms, "classifier": (time.perf_counter() - tc) * 1e3}
            by_clf = probability >= clf.probability_threshold
            is_ng = (by_clf or is_ng) if clf.decision == "either" else by_clf
        t2 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, **stage_ms, "total": (t2 - t0) * 1e3}
        return Prediction(score=score, anomaly_map=amap, is_ng=is_ng, timings_ms=timings, probability=probability)

    def _check_calibration(self) -> None:
        """Score the bundle's calibration frames; raise :class:`BundleError` naming each frame whose score moved."""
        cal = self._manifest.calibration
        if cal is None:
            logger.info(
                "%s: the bundle ships no calibration frames (exported by an older rdedge); load-time score check "
                "skipped",
                self.bundle_dir,
            )
            return
        path = self.bundle_dir / cal.file
        inp = self._manifest.input
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable calibration frames: {exc}") from None
        want = (len(cal.scores), inp.height, inp.width, 3)
        if frames.dtype != np.uint8 or frames.shape != want:
            raise BundleError(f"{path}: calibration frames must be uint8 {want}, got {frames.dtype} {frames.shape}")
        t0 = time.perf_counter()
        got = [self.predict(f).score for f in frames]
        ms = (time.perf_counter() - t0) * 1e3
        tol = CALIB_REL_TOL * max(abs(s) for s in cal.scores) + CALIB_ABS_TOL
        moved = [
            f"frame {i}: recorded {r:.6g}, got {g:.6g} (|diff| {abs(g - r):.3g})"
            for i, (r, g) in enumerate(zip(cal.scores, got, strict=True))
            if not abs(g - r) <= tol
        ]
        if moved:
            raise BundleError(
                f"{self.bundle_dir}: refused: calibration scores moved beyond the tolerance {tol:.3g} "
                f"({self.backend.name}, {cal.file}): {'; '.join(moved)}. The model no longer scores as it did at "
                "export (altered weights, a wrong engine or preprocessing); re-export the bundle"
            )
        worst = max(abs(g - r) for r, g in zip(cal.scores, got, strict=True))
        self.calibration = CalibrationCheck(len(got), worst, tol, ms)
        logger.info(
            "%s: calibration check passed: %d frames, max |diff| %.3g (tolerance %.3g), %.1f ms",
            self.bundle_dir,
            len(got),
            worst,
            tol,
            ms,
        )

    def warmup(self, n: int = 2) -> None:
        """Run ``n`` predictions on a mid-grey frame so first-call allocations happen before real frames."""
        frame = np.full((self._manifest.input.height, self._manifest.input.width, 3), 128, dtype=np.uint8)
        for _ in range(n):
            self.predict(frame)

    def close(self) -> None:
        """Release the backend. Idempotent."""
        self._classifier = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> AnomalyModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_int8(bundle_dir: Path, manifest: Manifest, allow_failed: bool) -> None:
    """Refuse a bundle whose INT8 parts failed the export's score-parity rule, unless ``allow_failed``.

    Raises:
        BundleError: ``manifest.int8.accepted`` is false and ``allow_failed`` is not set.
    """
    q = manifest.int8
    if q is None or q.accepted:
        return
    what = (
        f"{bundle_dir}: int8 parts {q.parts} failed the export's score-parity rule: max |int8 - fp32| score "
        f"{q.score_max_abs_diff:.3g} = {q.max_frac_of_threshold:.2%} of the threshold {q.threshold:.6g} (allowed "
        f"{q.tolerance_frac_of_threshold:.2%}, {q.n_images} images of {q.parity_source})"
    )
    if not allow_failed:
        raise BundleError(
            f"{what}; refused: use the fp32 export, or set backend.allow_failed_int8: true to run it anyway"
        )
    logger.warning("%s; loaded anyway (backend.allow_failed_int8)", what)


def _load_classifier(bundle_dir: Path, manifest: Manifest, threads: int) -> Any | None:
    """The classifier part's onnxruntime CPU session (whatever backend runs the chain), or ``None`` without one.

    Raises:
        MissingExtraError: onnxruntime (``rdedge[cpu]``) is missing.
        BundleError: the graph does not load or its inputs/outputs differ from the manifest's part spec.
    """
    clf = manifest.classifier
    if clf is None:
        return None
    from runtime.backends.onnxruntime import check_io, import_onnxruntime

    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = bundle_dir / clf.part.file
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise BundleError(f"{path}: onnxruntime cannot load the classifier part: {exc}") from None
    check_io(path, clf.part, sess)
    logger.info("%s: classifier part %s (%s), decision %s", bundle_dir, clf.part.file, clf.model, clf.rule)
    return sess
