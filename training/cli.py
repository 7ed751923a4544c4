"""Training verbs: ``make-demo-data``, ``train``, ``evaluate`` (``pretrain`` lives in :mod:`training.simclr_cli`).

torch and friends are imported inside each command, so ``rdedge --help`` and the runtime verbs work without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training._deps import require

_BACKBONES = "wide_resnet50_2 (the paper's teacher), resnet18, efficientnet_lite0 (offline default)"


def _check_torch() -> None:
    require("torch", "train", "needed to train and evaluate")


def make_demo_data_command(args: argparse.Namespace) -> int:
    require("cv2", "cpu", "image I/O")
    from training.demo_data import make_demo_data

    root = make_demo_data(args.dir, n_train=args.n_train, size=args.size, seed=args.seed)
    print(root)
    return 0


def _aspect(text: str) -> str | float:
    if text in ("auto", "square"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"auto, square or a height / width number, not {text!r}") from None


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="rdedge train")
    p.add_argument(
        "--data", required=True, type=Path, help="MVTec-layout category (train/good) or a folder of good images"
    )
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, log.jsonl, config.json")
    p.add_argument("--config", type=Path, help="YAML training config (command-line options override it)")
    p.add_argument("--backbone", help=f"teacher: {_BACKBONES}")
    p.add_argument("--teacher-weights", type=Path, help="local teacher state_dict for offline boxes")
    p.add_argument(
        "--steps",
        type=int,
        help="optimiser steps per student (default 500; both students, 200 images, 2 CPU cores: 7.9 min at 256 px, "
        "2.2 min at 128 px)",
    )
    p.add_argument("--epochs", type=int, help="passes over the training images instead of --steps")
    p.add_argument(
        "--image-size",
        type=int,
        help="input side, multiple of 32 (default 256); parts of another aspect keep about this side squared in "
        "pixels (see --aspect)",
    )
    p.add_argument(
        "--aspect",
        type=_aspect,
        help="input height / width: auto (default: the training images' own when they share one, e.g. 416 x 160 "
        "for 512 x 203 parts at --image-size 256; else square) | square | a number",
    )
    p.add_argument("--batch-size", type=int, help="images per step (default 8)")
    p.add_argument(
        "--max-images",
        type=int,
        help="train on at most N train/good images, chosen evenly (default all); the rest help set the threshold",
    )
    p.add_argument("--lr", type=float, help="Adam learning rate (default 0.005)")
    p.add_argument("--max-minutes", type=float, help="stop at the first evaluation past this wall time")
    p.add_argument(
        "--recipe",
        choices=["auto", "rd", "paper"],
        default="auto",
        help="scoring: auto = chosen by the validation signal among scales, standardisation, max/top-1%% and "
        "fusion with a density head (default); rd = the same without the density head; paper = the RD paper's "
        "(all scales, raw features, max, no density, square input). The checkpoint is chosen by the signal in "
        "every case",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, help="seed for split, init and shuffling (default 0)")
    p.add_argument("--aux", type=Path, help="SimCLR run folder ('rdedge pretrain'): train with the auxiliary backbone")
    p.add_argument(
        "--projection",
        choices=["auto", "identity", "aux", "rdpp"],
        help="student: auto (default: train plain RD and RD++, keep the one the validation signal rates higher), "
        "identity (plain RD only), rdpp (RD++ only), aux (SimCLR-aligned, set by --aux)",
    )
    p.add_argument(
        "--objective",
        choices=["rd", "rde"],
        help="rd = Reverse Distillation on cached frozen-teacher features (default); rde = RD-E (Liu et al., AAAI "
        "2025): a frozen ImageNet expert, a fine-tuned teacher copy and a student trained on Perlin-mask synthetic "
        "anomalies every step (slower: the teacher runs every step); the bundle holds the tuned teacher + student",
    )
    p.add_argument(
        "--gii",
        choices=["gated", "ungated", "off"],
        help="RD-E guided information injection at the two decoder junctions: gated by the per-pixel "
        "cos(decoder, teacher) (default), ungated, or off (plain RD decoder)",
    )
    p.add_argument(
        "--shots",
        type=int,
        metavar="K",
        help="few-shot mode (COFT-AD, seed 001): learn from K (1..32) good images drawn with --seed: contrastive "
        "fine-tuning of the teacher, Mahalanobis image score, per-position density map, threshold by leave-one-out "
        "on the K images; writes OUT/fewshot.pt ('rdedge export' turns it into a bundle). Uses --backbone, "
        "--image-size (default 128 here), --steps (default 40), --seed; other options do not apply",
    )
    p.add_argument(
        "--negatives",
        choices=["none", "synth"],
        default="none",
        help="few-shot: synth adds synthesised defects as contrastive negatives (default none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_last.pt in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def fewshot_command(args: argparse.Namespace) -> int:
    """``rdedge train --shots K``: :func:`training.fewshot.train_fewshot`."""
    from training.fewshot import FewShotConfig, train_fewshot

    fields = {"shots": args.shots, "negatives": args.negatives, "backbone": args.backbone,
              "image_size": args.image_size, "steps": args.steps, "seed": args.seed, "lr": args.lr}  # fmt: skip
    try:
        cfg = FewShotConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:  # pydantic's message names the field (shots, image_size, ...)
        from training.errors import ConfigError

        raise ConfigError(f"--shots mode: {exc}") from None
    print(train_fewshot(args.data, args.out, cfg))
    return 0


def train_command(args: argparse.Namespace) -> int:
    _check_torch()
    if args.shots is not None:
        return fewshot_command(args)
    from training.config import load_train_config
    from training.train import fit

    projection = args.projection or ("aux" if args.aux else None)
    overrides = {
        "model.backbone": args.backbone,
        "model.teacher_weights": str(args.teacher_weights) if args.teacher_weights else None,
        "model.projection": projection,
        "model.objective": args.objective,
        "extra.rde.gii": args.gii,
        "optim.epochs": args.epochs,
        "optim.steps": args.steps,
        "optim.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "optim.max_minutes": args.max_minutes,
        "data.image_size": args.image_size,
        "data.aspect": args.aspect,
        "data.max_images": args.max_images,
        "device": args.device,
        "seed": args.seed,
    }
    if args.recipe in ("rd", "paper"):
        overrides["selection.density"] = False
    if args.recipe == "paper":
        overrides.update(
            {
                "data.aspect": args.aspect or "square",  # the paper squashes every image to a square
                "selection.pin.weights": [1.0, 1.0, 1.0],
                "selection.pin.standardize": False,
                "selection.pin.reduction": "max",
            }
        )
    cfg = load_train_config(args.config, overrides)
    if args.gii and cfg.model.objective != "rde":
        from training.errors import ConfigError

        raise ConfigError("--gii applies to RD-E only: add --objective rde")
    best = fit(cfg, args.data, args.out, resume=args.resume, aux_dir=args.aux, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(best)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    _check_torch()
    from training.evaluate import evaluate, format_table

    metrics = evaluate(args.run, args.data, args.report, args.device, args.batch_size, not args.no_progress)
    print(format_table(metrics))
    op = metrics.get("at_validation_threshold")
    if op:
        thr = metrics.get("validation_threshold", {})
        stats = thr.get("stats", {})
        print(
            f"threshold {op['threshold']:.5f} from {thr.get('source', 'the validation split')}: test false-alarm "
            f"rate {op['false_alarm_rate']:.3f}, recall {op['recall']:.3f}, precision {op['precision']:.3f}"
        )
        if "val_far_upper_95" in stats:
            print(
                f"  {int(stats['n'])} defect-free images confirm a false-alarm rate of at most "
                f"{100 * stats['val_far_upper_95']:.1f}% (95%); the target is {100 * thr['target_false_alarm_rate']:g}%"
            )
    if args.report:
        print(f"report: {Path(args.report) / 'index.html'}")
    if args.json:
        json.dump(metrics, sys.stdout, indent=2)
        print()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the training verbs to the ``rdedge`` parser."""
    p = sub.add_parser(
        "make-demo-data",
        help="write a synthetic MVTec-layout category (the embedded demo and test data)",
        description="Deterministic synthetic parts with scratches, spots, cracks and missing chunks, exact masks. "
        "Prints the category folder.",
    )
    p.add_argument("dir", type=Path, help="output folder (the category is DIR/synthetic)")
    p.add_argument("--n-train", type=int, default=60, help="defect-free training images (default 60)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.set_defaults(func=make_demo_data_command)

    p = sub.add_parser(
        "train",
        help="train a Reverse Distillation model on defect-free images",
        description="Train RD (frozen ImageNet teacher -> projection -> OCBE -> student decoder) on the good images. "
        "Images are decoded and the teacher run once; each step trains OCBE + decoder on cached features (the "
        "progress bar shows images/s). 10% of train/good is kept aside: every 100 steps it and synthetic defects "
        "made from it (texture, cut-paste, scratch, spot) score every candidate scoring recipe; the best "
        "(checkpoint, recipe) is checkpoint_best.pt, and selection.json records the signal, the candidates and the "
        "choice. By default two students train this way, plain RD and RD++ (candidates/identity, candidates/rdpp), "
        "and the one with the higher signal becomes the run's checkpoint (--projection pins one). The same images "
        "set the threshold at export. The test set is never used. --objective rde trains "
        "RD-E instead (no feature cache: a frozen expert, a tuned teacher and the student every step; selected by the "
        "same signal, exported as the same five parts).",
    )
    train_parser(p)
    p.set_defaults(func=train_command)

    p = sub.add_parser(
        "evaluate",
        help="image AUROC, F1-max, pixel AUROC, AUPRO on the test set, with an HTML report",
        description="Evaluate a run on DATA/test (MVTec layout). Writes metrics.json to the run folder (and the "
        "report folder) and prints a table; --report adds ROC, histogram and heatmap overlays with index.html.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint file) from 'rdedge train'")
    p.add_argument("--data", required=True, type=Path, help="MVTec-layout category with test/ and ground_truth/")
    p.add_argument("--report", type=Path, help="report folder (index.html, roc.png, histogram.png, overlays/)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--json", action="store_true", help="also print metrics.json to stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=evaluate_command)

    from training import simclr_cli  # ``pretrain``: SimCLR auxiliary backbone

    simclr_cli.register(sub)
