"""Detection-quality benchmark of the default recipe (issue: out-detect PaDiM and PatchCore), on CPU.

Protocol of ../shared/PEERS.md: efficientnet_lite0 ImageNet weights, at most 200 train/good images chosen evenly
(10% of them kept aside: they and synthetic defects made from them choose the checkpoint and the scoring recipe, and
set the threshold), the full test set only ever evaluated. Each row is one (dataset, image size, seed) run of
``rdedge train`` with no tuning flags (or with ``--set key=value`` overrides for ablation rows), then ``evaluate``.
Rows are merged into ``benchmarks/results/detection_<tag>.json`` as they finish (a killed run keeps what it had),
and ``detection_<tag>.md`` gets mean +- std over seeds against the peers.

    python benchmarks/detection.py --names magnetic_tile kolektorsdd --sizes 128 --seeds 0 1 2 --tag default
    python benchmarks/detection.py --names kolektorsdd --sizes 128 --seeds 0 --tag relu --set model.signed_decoder=false
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from training.config import load_train_config
from training.evaluate import evaluate
from training.train import fit

REPO = Path(__file__).resolve().parents[1]
#: ../shared/PEERS.md (anomalib 2.7.0, same weights, same CPU kind): image AUROC, F1-max, pixel AUROC, AUPRO.
PEERS: dict[str, dict[str, tuple[float, float, float | None, float | None]]] = {
    "magnetic_tile": {"PatchCore": (0.869, 0.871, 0.785, 0.708), "PaDiM": (0.898, 0.883, 0.742, 0.736)},
    "kolektorsdd": {"PatchCore": (0.733, 0.661, 0.835, 0.353), "PaDiM": (0.738, 0.688, 0.874, 0.417)},
    "elpv_mono": {"PatchCore": (0.955, 0.933, None, None), "PaDiM": (0.944, 0.931, None, None)},
}
METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _merge(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = (row["dataset"], row["image_size"], row["seed"])
    rows = [r for r in rows if (r["dataset"], r["image_size"], r["seed"]) != key] + [row]
    return rows


def _summary(rows: list[dict[str, Any]], tag: str, overrides: dict[str, Any]) -> str:
    lines = [
        f"# Detection benchmark `{tag}`" + (f" (overrides {overrides})" if overrides else " (default recipe)"),
        "",
        "Mean +- std over seeds; peers from ../shared/PEERS.md (256 px). 'best peer' is the better of PaDiM and "
        "PatchCore per metric.",
        "",
        "| dataset | px | seeds | image AUROC | F1-max | pixel AUROC | AUPRO | train s (steps) | best peer img / px / "
        "AUPRO | chosen recipes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["image_size"]), []).append(r)
    for (name, size), rs in sorted(groups.items()):
        cells = []
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            cells.append(f"{np.mean(vals):.3f} +- {np.std(vals):.3f}" if vals else "n/a")
        peer = PEERS.get(name, {})
        best = [max((p[i] for p in peer.values() if p[i] is not None), default=None) for i in (0, 2, 3)]
        best_s = " / ".join("n/a" if b is None else f"{b:.3f}" for b in best)
        train = f"{np.mean([r['train_s'] for r in rs]):.0f} ({rs[0]['steps']})"
        recipes = "; ".join(sorted({(f"{r['student']}: " if r.get("student") else "") + r["recipe"] for r in rs}))
        lines.append(f"| {name} | {size} | {len(rs)} | " + " | ".join(cells) + f" | {train} | {best_s} | {recipes} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--names", nargs="+", default=["magnetic_tile", "kolektorsdd"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--max-images", type=int, default=200)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (ablation rows)")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rdedge-bench/detection"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count() or 2)
    overrides = _parse_set(args.set)
    path = args.results / f"detection_{args.tag}.json"
    args.results.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        for size in args.sizes:
            for seed in args.seeds:
                data = args.datasets / name
                cfg = load_train_config(
                    None, {"data.image_size": size, "data.max_images": args.max_images, "seed": seed, **overrides}
                )
                run = args.out / args.tag / f"{name}-{size}-s{seed}"
                t0 = time.perf_counter()
                fit(cfg, data, run, show_progress=False)
                wall = time.perf_counter() - t0
                sel = json.loads((run / "selection.json").read_text())
                log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
                m = evaluate(run, data, None, show_progress=False)
                row = {
                    "dataset": name,
                    "image_size": size,
                    "input_hw": m.get("input_hw"),
                    "seed": seed,
                    **{k: m.get(k) for k in METRICS},
                    "per_defect": m["per_defect"],
                    "at_validation_threshold": m.get("at_validation_threshold"),
                    "threshold_source": m.get("validation_threshold", {}).get("source"),
                    "threshold_far_upper_95": m.get("validation_threshold", {})
                    .get("stats", {})
                    .get("val_far_upper_95"),
                    "recipe": m["recipe"],
                    "best_step": sel["best_step"],
                    "signal": sel["best_signal"],
                    "steps": sel["steps"],
                    # auto: both students' training (selection.json's own train_s is the winner's alone)
                    "train_s": sel.get("projection", {}).get("total_train_s", sel["train_s"]),
                    "student": sel.get("projection", {}).get("chosen"),
                    "students": sel.get("projection", {}).get("candidates"),
                    "cache_s": sel["cache_s"],
                    "knn_share": (sel.get("density_knn") or {}).get("chosen"),
                    "centre": sel.get("centre"),
                    "wall_s": wall,
                    "images_per_s": float(np.mean([r["images_per_s"] for r in log])),
                    "steps_per_s": float(np.mean([r["steps_per_s"] for r in log])),
                    "history": [{k: r.get(k) for k in ("step", "loss", "val_loss", "signal", "recipe")} for r in log],
                }
                rows = _merge(path, row)
                meta = {
                    "tag": args.tag,
                    "overrides": overrides,
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                    "max_images": args.max_images,
                }
                path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                (args.results / f"detection_{args.tag}.md").write_text(_summary(rows, args.tag, overrides))
                logging.info(
                    "%s %d px seed %d: image %.3f pixel %s aupro %s (%s) in %.0f s",
                    name,
                    size,
                    seed,
                    m["image_auroc"],
                    m.get("pixel_auroc"),
                    m.get("aupro"),
                    m["recipe"],
                    wall,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
