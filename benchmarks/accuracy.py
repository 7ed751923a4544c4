"""Accuracy benchmark: efficientnet_lite0 RD on the real datasets in ../shared/datasets, on CPU.

Same protocol as the peer figures in ../shared/PEERS.md: 256x256, at most 200 training images chosen evenly from
the sorted train/good list (10% of them kept aside for model selection and the threshold), full test set, nothing
tuned on the test set. Writes benchmarks/results/accuracy.json and accuracy.md.

    python benchmarks/accuracy.py [--datasets ../shared/datasets] [--epochs 12] [--out /tmp/rdedge-bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from training.config import load_train_config
from training.evaluate import evaluate
from training.train import fit

REPO = Path(__file__).resolve().parents[1]
PEERS = {  # ../shared/PEERS.md (anomalib 2.7.0, same weights, same CPU kind)
    "magnetic_tile": {"PatchCore": (0.869, 0.871, 0.785, 0.708), "PaDiM": (0.898, 0.883, 0.742, 0.736)},
    "kolektorsdd": {"PatchCore": (0.733, 0.661, 0.835, 0.353), "PaDiM": (0.738, 0.688, 0.874, 0.417)},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--names", nargs="+", default=["magnetic_tile", "kolektorsdd"])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-images", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-time cap per dataset")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rdedge-bench/accuracy"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 2)

    rows = []
    for name in args.names:
        data = args.datasets / name
        cfg = load_train_config(
            None,
            {
                "model.backbone": "efficientnet_lite0",
                "data.image_size": args.image_size,
                "data.max_images": args.max_images,
                "optim.epochs": args.epochs,
                "optim.max_minutes": args.max_minutes,
            },
        )
        run = args.out / name
        t0 = time.perf_counter()
        fit(cfg, data, run, show_progress=False)
        train_min = (time.perf_counter() - t0) / 60
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        t1 = time.perf_counter()
        m = evaluate(run, data, args.out / f"{name}-report", show_progress=False)
        eval_s = time.perf_counter() - t1
        rows.append(
            {
                "dataset": name,
                "image_auroc": m["image_auroc"],
                "image_f1_max": m["image_f1_max"],
                "pixel_auroc": m.get("pixel_auroc"),
                "aupro": m.get("aupro"),
                "epochs_run": len(log),
                "best_epoch": m["epoch"],
                "train_minutes": train_min,
                "images_per_s": sum(r["images_per_s"] for r in log) / len(log),
                "eval_seconds": eval_s,
                "n_test": m["n_images"],
                "at_validation_threshold": m.get("at_validation_threshold"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "max_images": args.max_images,
        "max_minutes": args.max_minutes,
        "backbone": "efficientnet_lite0",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# RD accuracy, efficientnet_lite0, CPU ({meta['date']}, {meta['cpu_count']} cores)",
        "",
        f"{args.image_size} px, <= {args.max_images} train/good images (10% validation), {args.epochs} epochs max"
        + (f", {args.max_minutes} min cap" if args.max_minutes else "")
        + "; checkpoint = lowest validation loss.",
        "",
        "| dataset | model | image AUROC | F1-max | pixel AUROC | AUPRO | train min | img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | rdedge RD | {r['image_auroc']:.3f} | {r['image_f1_max']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['train_minutes']:.1f} | {r['images_per_s']:.1f} |"
        )
        for peer, v in PEERS.get(r["dataset"], {}).items():
            lines.append(
                f"| {r['dataset']} | anomalib {peer} (PEERS.md) | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} | "
                f"{v[3]:.3f} | | |"
            )
    (args.results / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
