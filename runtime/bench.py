"""``rdedge bench``: latency and throughput of a bundle on this box, as one JSON-serialisable dict.

Cold start is measured the way a service restart feels it: from the call (before the bundle is read and hashed) to
the first prediction's result. Stage latencies come from :attr:`runtime.engine.Prediction.timings_ms`; the frame is
fed at the camera's size (``image`` as decoded, or a synthetic 1280x720 frame) so preprocessing includes the resize.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import DataError

logger = logging.getLogger(__name__)

SYNTHETIC_FRAME_HW = (720, 1280)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _stats(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
        "mean": round(float(a.mean()), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
    }


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    trt = sys.modules.get("tensorrt")  # only report it if the backend loaded it
    if trt is not None:
        info["tensorrt"] = getattr(trt, "__version__", "?")
    return info


def _load_frame(image: Path | None) -> np.ndarray:
    if image is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(*SYNTHETIC_FRAME_HW, 3), dtype=np.uint8)
    frame = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if frame is None:
        raise DataError(f"cannot read benchmark image {image}")
    return frame


def bench(
    bundle_dir: Path, backend: BackendConfig, frames: int = 200, warmup: int = 10, image: Path | None = None
) -> dict[str, Any]:
    """Benchmark a bundle end to end (preprocess + every part) on one frame repeated.

    Args:
        bundle_dir: bundle directory.
        backend: backend config to benchmark.
        frames: timed predictions (>= 1).
        warmup: untimed predictions after the first one.
        image: frame to feed (any size, decoded as BGR); default a synthetic 1280x720 noise frame.

    Returns:
        ``{"model_id", "bundle", "backend": {...}, "frames", "warmup", "input": {"frame_hw", "model_hw"},
        "cold_start_ms", "first_predict_ms", "stages_ms": {stage: {"p50", "p99", "mean", "min", "max"}},
        "fps", "peak_rss_mb", "host": {...}}`` -- ``stages_ms`` has ``preprocess``, one key per backend stage
        and ``total``; ``fps`` is ``frames`` divided by the wall time of the timed loop.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    frame = _load_frame(image)
    t_call = time.perf_counter()
    model = AnomalyModel(Path(bundle_dir), backend)
    try:
        t_loaded = time.perf_counter()
        first = model.predict(frame)
        cold_ms = (time.perf_counter() - t_call) * 1e3
        for _ in range(max(0, warmup)):
            model.predict(frame)
        per_stage: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for _ in range(frames):
            for k, v in model.predict(frame).timings_ms.items():
                per_stage.setdefault(k, []).append(v)
        wall = time.perf_counter() - t0
        manifest = model.manifest
    finally:
        model.close()
    result: dict[str, Any] = {
        "model_id": manifest.model_id,
        "bundle": str(bundle_dir),
        "backend": backend.model_dump(mode="json"),
        "frames": frames,
        "warmup": warmup,
        "input": {"frame_hw": list(frame.shape[:2]), "model_hw": [manifest.input.height, manifest.input.width]},
        "cold_start_ms": round(cold_ms, 3),
        "load_ms": round((t_loaded - t_call) * 1e3, 3),
        "first_predict_ms": round(first.timings_ms["total"], 3),
        "stages_ms": {k: _stats(v) for k, v in per_stage.items()},
        "fps": round(frames / wall, 2) if wall > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "host": _host(),
    }
    logger.info(
        "bench %s on %s: total p50 %.3f ms, %.1f frames/s",
        manifest.model_id,
        backend.kind,
        result["stages_ms"]["total"]["p50"],
        result["fps"] or 0.0,
    )
    return result
