"""RD-E ablation (issue 11): plain RD vs RD-E with gated, ungated and no injection, same images, size and steps.

Protocol (../shared/PEERS.md and benchmarks/detection.py): efficientnet_lite0 ImageNet weights, at most 200
train/good images chosen evenly (10% kept aside: they and synthetic defects made from them choose the checkpoint and
the scoring recipe), the test set only ever evaluated (``training.evaluate``). Every row trains the same number of
steps at the same batch size; ``train_s`` says what each costs (RD-E runs the expert and the teacher every step, RD
reads cached features). ``signal`` is the validation signal the selection used (never the test set): the figure on
which an RD-E variant may be said to beat RD.

Rows are merged into ``benchmarks/results/rde_ablation.json`` as they finish (a killed run keeps what it had) and
``rde_ablation.md`` is rewritten from them.

    nice -n 10 python benchmarks/rde_ablation.py --names magnetic_tile --rows rd rde-gated --steps 300 --seeds 0
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

from training.config import load_train_config
from training.evaluate import evaluate
from training.train import fit

REPO = Path(__file__).resolve().parents[1]
ROWS: dict[str, dict[str, Any]] = {
    "rd": {"model.projection": "identity"},  # plain RD alone (the default 'auto' trains RD and RD++)
    "rdpp": {"model.projection": "rdpp"},
    "rde-gated": {"model.objective": "rde", "extra.rde.gii": "gated"},
    "rde-ungated": {"model.objective": "rde", "extra.rde.gii": "ungated"},
    "rde-off": {"model.objective": "rde", "extra.rde.gii": "off"},
}
METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")


def _merge(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = (row["dataset"], row["variant"], row["image_size"], row["seed"], row["steps_budget"])
    return [r for r in rows if (r["dataset"], r["variant"], r["image_size"], r["seed"], r["steps_budget"]) != key] + [
        row
    ]


def _summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# RD-E ablation (issue 11)",
        "",
        f"{meta['date']}, {meta['machine']}; efficientnet_lite0, <= {meta['max_images']} train/good images, batch "
        f"{meta['batch_size']}; same step budget per row (shown). Mean +- std over the seeds listed (one seed: "
        "no spread). `signal` = the validation signal (held-out good + synthetic defects) of the chosen checkpoint; "
        "the test metrics were never used to choose anything. RD-E textures: "
        f"{meta['texture']}.",
        "",
        "| dataset | variant | px | steps | seeds | signal | image AUROC | F1-max | pixel AUROC | AUPRO | train s | "
        "chosen recipe (best step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["image_size"], r["steps_budget"], r["variant"]), []).append(r)
    order = list(ROWS)
    for (name, size, steps, variant), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], order.index(kv[0][3]))):
        cells = []
        for m in ("signal", *METRICS):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if not vals:
                cells.append("n/a")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{np.mean(vals):.3f} +- {np.std(vals):.3f}")
        train = f"{np.mean([r['train_s'] for r in rs]):.0f}"
        chosen = "; ".join(f"{r['recipe']} ({r['best_step']})" for r in rs)
        lines.append(
            f"| {name} | {variant} | {size} | {steps} | {len(rs)} | " + " | ".join(cells) + f" | {train} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--names", nargs="+", default=["magnetic_tile", "kolektorsdd"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--every", type=int, default=100, help="selection.every_steps")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--max-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rdedge-bench/rde_ablation"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 2)))
    path = args.results / "rde_ablation.json"
    args.results.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        for variant in args.rows:
            for seed in args.seeds:
                data = args.datasets / name
                overrides = {
                    "data.image_size": args.size,
                    "data.max_images": args.max_images,
                    "seed": seed,
                    "optim.steps": args.steps,
                    "optim.batch_size": args.batch_size,
                    "selection.every_steps": args.every,
                    **ROWS[variant],
                }
                cfg = load_train_config(None, overrides)
                run = args.out / f"{name}-{variant}-{args.size}-{args.steps}-s{seed}"
                t0 = time.perf_counter()
                fit(cfg, data, run, show_progress=False)
                wall = time.perf_counter() - t0
                sel = json.loads((run / "selection.json").read_text())
                m = evaluate(run, data, None, show_progress=False)
                row = {
                    "dataset": name,
                    "variant": variant,
                    "image_size": args.size,
                    "seed": seed,
                    "steps_budget": args.steps,
                    "overrides": overrides,
                    **{k: m.get(k) for k in METRICS},
                    "per_defect": m.get("per_defect"),
                    "recipe": m["recipe"],
                    "signal": sel["best_signal"],
                    "best_step": sel["best_step"],
                    "steps": sel["steps"],
                    "train_s": sel["train_s"],
                    "wall_s": wall,
                    "history": sel["history"],
                    "run": str(run),
                }
                rows = _merge(path, row)
                meta = {
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, nice 10), torch "
                    f"{torch.__version__}",
                    "max_images": args.max_images,
                    "batch_size": args.batch_size,
                    "texture": "mixed (crops of other training images of the batch + seeded simplex noise; no DTD)",
                }
                path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                (args.results / "rde_ablation.md").write_text(_summary(rows, meta))
                logging.info(
                    "%s %s seed %d: signal %.3f image %.3f pixel %s aupro %s (%s) train %.0f s",
                    name,
                    variant,
                    seed,
                    sel["best_signal"],
                    m["image_auroc"],
                    m.get("pixel_auroc"),
                    m.get("aupro"),
                    m["recipe"],
                    sel["train_s"],
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
