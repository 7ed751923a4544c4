"""INT8 on CPU against the default bundle of the same run: parity rule, image AUROC moved, speed-up (issue 15).

For each trained run: ``rdedge export`` twice (the default precision, and ``--precision int8``, calibrated on the
run's defect-free training images, parity on its validation images, the per-part sensitivity search when the
all-INT8 chain fails), then :func:`runtime.bench.bench` on both bundles with the same onnxruntime CPU backend and
thread count. The image AUROC pair is the export's information-only figure on the run's labelled test split
(``manifest.int8.auroc_*``); nothing is chosen on it.

    python benchmarks/int8.py --runs RUN_DIR [RUN_DIR ...] [--threads 2] [--frames 200]

Writes ``benchmarks/results/int8.json`` (rows merged by run) and ``int8.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.pipeline import ExportOptions, export_bundle  # noqa: E402
from runtime.bench import bench  # noqa: E402
from runtime.bundle import load_manifest  # noqa: E402
from runtime.config import BackendConfig  # noqa: E402


def _row(run: Path, out: Path, threads: int, frames: int) -> dict[str, Any]:
    name = f"{run.parent.name}-{run.name}"
    base, q8 = out / f"{name}-default", out / f"{name}-int8"
    t0 = time.perf_counter()
    export_bundle(ExportOptions(run=run, out=base, force=True))
    t1 = time.perf_counter()
    export_bundle(ExportOptions(run=run, out=q8, precision="int8", force=True))
    t2 = time.perf_counter()
    spec = load_manifest(q8).int8
    assert spec is not None
    backend = BackendConfig(kind="onnxruntime", threads=threads, allow_failed_int8=True)
    b_base = bench(base, backend, frames=frames)
    b_q8 = bench(q8, backend, frames=frames)
    p_base, p_q8 = b_base["stages_ms"]["total"]["p50"], b_q8["stages_ms"]["total"]["p50"]
    return {
        "run": str(run),
        "image_size": load_manifest(base).input.height,
        "export_s": {"default": round(t1 - t0, 1), "int8": round(t2 - t1, 1)},
        "int8": spec.model_dump(mode="json"),
        "bench_default": b_base,
        "bench_int8": b_q8,
        "p50_ms": {"default": p_base, "int8": p_q8},
        "p99_ms": {"default": b_base["stages_ms"]["total"]["p99"], "int8": b_q8["stages_ms"]["total"]["p99"]},
        "speedup_p50": round(p_base / p_q8, 3) if p_q8 else None,
    }


def _md(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        f"# INT8 on CPU (onnxruntime, {threads} threads, `benchmarks/int8.py`)",
        "",
        "| run | px | INT8 parts | max dev / thr | rule | AUROC fp32 -> int8 | p50 default -> int8 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["int8"]
        au = f"{q['auroc_fp32']:.4f} -> {q['auroc_int8']:.4f}" if q.get("auroc_fp32") is not None else "n/a"
        lines.append(
            f"| {Path(r['run']).name} | {r['image_size']} | {', '.join(q['parts'])} | "
            f"{100 * q['max_frac_of_threshold']:.2f}% | {'pass' if q['accepted'] else 'FAIL'} | {au} | "
            f"{r['p50_ms']['default']:.2f} -> {r['p50_ms']['int8']:.2f} | {r['speedup_p50']}x |"
        )
        if q.get("part_max_frac"):
            each = ", ".join(f"{k} {100 * v:.2f}%" for k, v in q["part_max_frac"].items())
            lines.append(f"| | | each part alone: {each} | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rdedge-bench/int8"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = args.results / "int8.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for run in args.runs:
        row = _row(run, args.out, args.threads, args.frames)
        rows = [r for r in rows if r["run"] != row["run"]] + [row]
        doc = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": args.threads, "rows": rows}
        args.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        (args.results / "int8.md").write_text(_md(rows, args.threads))
        print(_md([row], args.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
