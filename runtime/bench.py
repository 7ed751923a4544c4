"""``rdedge bench``: latency and throughput of a bundle on this box, as one JSON-serialisable dict.

Cold start is measured the way a service restart feels it: from the call (before the bundle is read and hashed) to
the first prediction's result. Stage latencies come from :attr:`runtime.engine.Prediction.timings_ms`; the frame is
fed at the camera's size (``image`` as decoded, or a synthetic 1280x720 frame) so preprocessing includes the resize.

:func:`compare` (``rdedge bench --compare``) runs :func:`bench` for every backend setting the box can run (ONNX
Runtime CPU / CUDA, chain / fused, TensorRT with and without CUDA graph) on one or more bundles (e.g. the FP32 export
and an INT8 one), each in its own process, and :func:`comparison_table` lays them side by side.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.bundle import Manifest, load_manifest
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


def bundle_precision(manifest: Manifest) -> str:
    """A short label of what a bundle runs in: the parts' ONNX precision (``fp32``, ``int8``..) and its engines'.

    An INT8 bundle reads e.g. ``int8 (fp32: projection, score; parity 0.41% of thr, accepted)``.
    """
    q = manifest.int8
    if q is not None:
        verdict = "accepted" if q.accepted else "FAILED parity"
        label = f"int8 (fp32: {', '.join(q.fp32_parts)}; parity {q.max_frac_of_threshold:.2%} of thr, {verdict})"
    else:
        label = "+".join(sorted({str(p.precision) for p in manifest.parts}))
    engines = sorted({e.precision for e in manifest.engines})
    return f"{label} (engines {'+'.join(engines)})" if engines else label


def comparison_variants(
    manifest: Manifest, threads: int = 0, allow_failed_int8: bool = False
) -> list[tuple[str, BackendConfig]]:
    """The backend settings this box can run for a bundle, cheapest to set up first.

    ONNX Runtime CPU (chain, and fused with and without ``backend.spinning`` when the bundle has it); ONNX Runtime
    CUDA when the installed onnxruntime has the CUDA provider and the bundle has no INT8 parts (their QDQ graphs are
    the CPU path); TensorRT (chain, chain + CUDA graph, fused) when the bundle has engines and tensorrt imports.
    Engines built for another device are still listed: their row then says why they cannot run. ``threads`` (ONNX
    Runtime CPU intra-op threads, 0 = its default) and ``allow_failed_int8`` go into every setting.
    """
    base = {"threads": threads, "allow_failed_int8": allow_failed_int8}
    out = [("onnxruntime cpu", BackendConfig(**base))]
    if manifest.fused is not None:
        out.append(("onnxruntime cpu fused", BackendConfig(fused=True, **base)))
        out.append(("onnxruntime cpu fused spinning", BackendConfig(fused=True, spinning=True, **base)))
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and manifest.int8 is None:
            out.append(("onnxruntime cuda", BackendConfig(device="cuda", **base)))
    except ImportError:
        pass
    if manifest.engines and importlib.util.find_spec("tensorrt") is not None:
        out.append(("tensorrt", BackendConfig(kind="tensorrt", **base)))
        out.append(("tensorrt cuda graph", BackendConfig(kind="tensorrt", cuda_graph=True, **base)))
        if any(e.part == "fused" for e in manifest.engines):
            out.append(("tensorrt fused", BackendConfig(kind="tensorrt", fused=True, **base)))
    return out


def compare(
    bundles: list[Path],
    frames: int = 200,
    warmup: int = 10,
    image: Path | None = None,
    timeout_s: float = 600.0,
    threads: int = 0,
    allow_failed_int8: bool = False,
) -> list[dict[str, Any]]:
    """Bench every bundle under every backend setting this box can run, each in a fresh process.

    A fresh process per row keeps ``peak_rss_mb`` the row's own (``ru_maxrss`` only grows) and the cold start cold.
    ``threads`` and ``allow_failed_int8`` are passed to :func:`comparison_variants`.

    Returns:
        One dict per row: ``bundle``, ``model_id``, ``precision``, ``variant``, and either ``result`` (the
        :func:`bench` dict) or ``error`` (one line: why the row could not run).
    """
    rows: list[dict[str, Any]] = []
    for bundle_dir in bundles:
        manifest = load_manifest(bundle_dir, verify=False)
        for label, cfg in comparison_variants(manifest, threads, allow_failed_int8):
            row: dict[str, Any] = {"bundle": str(bundle_dir), "model_id": manifest.model_id,
                                   "precision": bundle_precision(manifest), "variant": label}  # fmt: skip
            code = (
                "import json, sys\n"
                "from pathlib import Path\n"
                "from runtime.bench import bench\n"
                "from runtime.config import BackendConfig\n"
                "a = json.loads(sys.argv[1])\n"
                "r = bench(Path(a['bundle']), BackendConfig.model_validate(a['cfg']), frames=a['frames'],\n"
                "          warmup=a['warmup'], image=Path(a['image']) if a['image'] else None)\n"
                "print('\\n' + json.dumps(r))\n"
            )
            arg = {"bundle": str(bundle_dir), "cfg": cfg.model_dump(mode="json"), "frames": frames,
                   "warmup": warmup, "image": str(image) if image else None}  # fmt: skip
            try:
                res = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], capture_output=True, text=True,
                                     timeout=timeout_s, cwd=_repo_root())  # fmt: skip
            except subprocess.TimeoutExpired:
                row["error"] = f"timed out after {timeout_s:.0f} s"
            else:
                if res.returncode == 0:
                    row["result"] = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
                    row["error"] = lines[-1][:300] if lines else f"exit {res.returncode}"
            logger.info("bench %s / %s: %s", manifest.model_id, label, "ok" if "result" in row else row["error"])
            rows.append(row)
    return rows


def _repo_root() -> str:
    """Folder from which ``import runtime`` finds this package (the child processes import it the same way)."""
    return str(Path(__file__).resolve().parents[1])


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare` rows: end-to-end and model-only p50 / p99, frames/s, peak RSS, cold start,
    and the model-only p50 speed-up against the first row that ran (e.g. the FP32 bundle, with an INT8 one after it).
    """
    head = (
        "| bundle | precision | backend | total p50 / p99 ms | model p50 / p99 ms | frames/s | peak RSS MiB | "
        "cold start ms | model speed-up vs row 1 |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    ref: float | None = None
    for row in rows:
        name = f"{row['model_id']}"
        if "result" not in row:
            lines.append(f"| {name} | {row['precision']} | {row['variant']} | not run: {row['error']} | | | | | |")
            continue
        r = row["result"]
        st = r["stages_ms"]
        model = [k for k in st if k not in ("preprocess", "total", "classifier")]
        # model time: the sum of the backend's stage p50s / p99s (an upper bound of the p99 of the sum)
        m50, m99 = sum(st[k]["p50"] for k in model), sum(st[k]["p99"] for k in model)
        ref = m50 if ref is None else ref
        lines.append(
            f"| {name} | {row['precision']} | {row['variant']} | {st['total']['p50']:.2f} / {st['total']['p99']:.2f} "
            f"| {m50:.2f} / {m99:.2f} | {r['fps']:.1f} | {r['peak_rss_mb']:.0f} | {r['cold_start_ms']:.0f} "
            f"| x{ref / m50:.2f} |"
        )
    return "\n".join(lines)
