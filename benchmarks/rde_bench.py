"""`rdedge bench` latency of every RD-E ablation bundle (issue 11): each run exported, then benched the same way.

For each run folder of ``benchmarks/rde_ablation.py``: ``rdedge export`` (default precision), then
:func:`runtime.bench.bench` with onnxruntime CPU, ``--threads`` threads, on a synthetic 1280x720 frame (what
``rdedge bench`` feeds by default). RD-E bundles have the same teacher architecture; their decoder part also reads
the teacher features.

    python benchmarks/rde_bench.py --runs /tmp/rdedge-bench/rde_ablation/*-128-500-s0 [--threads 2]

Writes ``benchmarks/results/rde_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.pipeline import ExportOptions, export_bundle  # noqa: E402
from runtime.bench import bench  # noqa: E402
from runtime.config import BackendConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rdedge-bench/rde_bundles"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for run in args.runs:
        bundle = args.out / run.name
        export_bundle(ExportOptions(run=run, out=bundle, force=True))
        b = bench(bundle, BackendConfig(kind="onnxruntime", threads=args.threads), frames=args.frames)
        st = b["stages_ms"]
        row = {"run": run.name, "p50_ms": st["total"]["p50"], "p99_ms": st["total"]["p99"], "fps": b["fps"],
               "stages_p50_ms": {k: v["p50"] for k, v in st.items()}, "peak_rss_mb": b["peak_rss_mb"]}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    doc = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": args.threads, "rows": rows}
    (args.results / "rde_bench.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
