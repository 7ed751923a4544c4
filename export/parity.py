"""Parity of exported graphs against torch, and the ONNX Runtime chain used for calibration.

Error measure (written to the manifest's ``parity`` dict and the log), for an exported output ``y`` and the torch
reference ``r`` over all elements of all outputs of a part::

    max_abs = max |y - r|
    max_rel = max_abs / max |r|        (error relative to the output's peak magnitude)

An elementwise relative error is meaningless where ``r`` crosses zero (feature maps after ReLU are mostly zero), so
the error is normalised by the peak instead. Tolerances (export fails beyond them):

* FP32 parts and the fused graph: ``max_rel <= PART_TOL = 1e-4`` (observed ~1e-6 .. 1e-5 on CPU).
* image scores of the calibration images, ONNX chain vs torch: ``max_rel <= SCORE_TOL = 1e-4``.
* FP16 chain (weights and activations FP16, score part FP32) vs FP32 chain: ``max_rel <= FP16_SCORE_TOL = 2e-2``
  on the image scores (observed ~1e-3); only a warning bound, since FP16 is an accuracy trade-off on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ParityError, require

log = logging.getLogger(__name__)

PART_TOL = 1e-4
SCORE_TOL = 1e-4
FP16_SCORE_TOL = 2e-2


def errors(reference: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(max_abs, max_rel)`` over all outputs (see the module docstring); shapes must match."""
    max_abs, peak = 0.0, 0.0
    for r, y in zip(reference, got, strict=True):
        r64, y64 = np.asarray(r, np.float64), np.asarray(y, np.float64)
        if r64.shape != y64.shape:
            raise ParityError(f"output shape {y64.shape} differs from torch's {r64.shape}")
        if not np.isfinite(y64).all():
            raise ParityError("exported graph produced NaN or Inf")
        if r64.size:
            max_abs = max(max_abs, float(np.abs(y64 - r64).max()))
            peak = max(peak, float(np.abs(r64).max()))
    return max_abs, max_abs / max(peak, 1e-12)


def check(what: str, max_abs: float, max_rel: float, tol: float) -> None:
    """Log the figures and raise :class:`ParityError` when ``max_rel > tol``."""
    log.info("parity %-22s max_abs %.3g  max_rel %.3g  (tolerance %.3g)", what, max_abs, max_rel, tol)
    if not max_rel <= tol:
        raise ParityError(
            f"parity check failed for {what}: max relative error {max_rel:.3g} (max abs {max_abs:.3g}) exceeds "
            f"the tolerance {tol:.3g}; the exported graph does not reproduce the torch model"
        )


def session(path: Path, threads: int = 2) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` with ``threads`` intra-op threads."""
    ort = require("onnxruntime", "cpu", "parity checks and threshold calibration")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run all outputs, in graph order, feeding only the inputs the graph declares."""
    wanted = {i.name for i in sess.get_inputs()}
    return list(sess.run(None, {k: v for k, v in feeds.items() if k in wanted}))


def chain_scores(sessions: Sequence[Any], images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Run a chain of sessions (parts in order, tensors passed by name) on ``images (N,3,H,W)``.

    Returns:
        ``(scores (N,), anomaly_maps (N,1,H,W))`` float32.
    """
    scores, maps = [], []
    for i in range(0, len(images), batch_size):
        tensors: dict[str, np.ndarray] = {"image": np.ascontiguousarray(images[i : i + batch_size], np.float32)}
        for sess in sessions:
            outs = run_session(sess, tensors)
            tensors.update(zip([o.name for o in sess.get_outputs()], outs, strict=True))
        scores.append(tensors["score"])
        maps.append(tensors["anomaly_map"])
    return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)
