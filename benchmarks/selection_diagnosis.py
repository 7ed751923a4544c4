"""Diagnosis (reported, never used to choose anything in a run): how the validation signal ranks the candidate
recipes of one trained run against what those recipes score on the test set.

For the run's best checkpoint it rebuilds the selection (training features, density head, validation images and
their synthetic defects, exactly as training did) and scores every candidate recipe twice: on the validation signal,
and on the test set (image AUROC, and pixel AUROC where the set has masks) through the same fast path, with the
test good images as negatives. It prints both side by side with the Spearman rank correlation and which candidate
the plain arg-max and the density tie break would pick. This is how the tie break's preference was found
(``benchmarks/results/selection_diagnosis.md``); a run never sees any of it.

    python benchmarks/selection_diagnosis.py RUN_DIR ../shared/datasets/kolektorsdd --out diag.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from training.backbones import get_spec
from training.build import load_model
from training.data import discover
from training.features import feature_set, load_images, load_readable
from training.scoring import ChannelStats, DensityHead
from training.selection import Selector
from training.synthetic import synthesize
from training.train import from_unit_rgb, to_unit_rgb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, cfg, _ = load_model(args.run / "checkpoint_best.pt")
    model.eval()
    spec = get_spec(cfg.model.backbone)
    size, dev = cfg.data.input_hw(), torch.device("cpu")
    splits = discover(args.data, cfg.data.val_fraction, cfg.seed, need_test=True, max_images=cfg.data.max_images)
    train_np, _, _ = load_readable(splits.train, size, spec.mean, spec.std)
    train_fs = feature_set(model.teacher, train_np, dev)
    stats = ChannelStats(spec.channels).fit(train_fs.feats)
    density = DensityHead(spec.channels, size, cfg.selection.density_dims).fit(train_fs.feats)
    val_np, _, _ = load_readable(splits.val, size, spec.mean, spec.std)
    synth01, masks, kinds = synthesize(
        to_unit_rgb(val_np, spec.mean, spec.std), cfg.selection.synthetic_per_image, cfg.seed
    )
    stride = max(1, size[0] // 128)
    common = (size, cfg.model.sigma, stats, density, None, stride)
    student = model.student()
    val = {}
    for tie in ("none", "density"):
        sel = Selector(
            feature_set(model.teacher, val_np, dev),
            feature_set(model.teacher, from_unit_rgb(synth01, spec.mean, spec.std), dev),
            masks,
            *common,
            kinds=kinds,
            tie_break=tie,
            bootstrap=cfg.selection.bootstrap,
            seed=cfg.seed,
        )
        val[tie] = sel.evaluate(student)
    goods = [s for s in splits.test if s.label == 0]
    bads = [s for s in splits.test if s.label == 1]
    good_np, _ = load_images(goods, size, spec.mean, spec.std)
    bad_np, bad_masks = load_images(bads, size, spec.mean, spec.std, with_masks=True)
    has_masks = bool(bads) and all(s.mask is not None for s in bads)
    assert bad_masks is not None
    test = Selector(
        feature_set(model.teacher, good_np, dev),
        feature_set(model.teacher, bad_np, dev),
        bad_masks if has_masks else np.ones((len(bads), *size), bool),
        *common,
        kinds=[s.defect for s in bads],
    ).evaluate(student)
    t_by = {r["recipe"]: r for r in test.results}
    rows = []
    for r in sorted(val["none"].results, key=lambda r: -r["signal"]):
        t = t_by[r["recipe"]]
        rows.append(
            {
                "recipe": r["recipe"],
                "signal": r["signal"],
                "per_kind": r["per_kind"],
                "test_image_auroc": t["image_auroc"],
                "test_pixel_auroc": t["pixel_auroc"] if has_masks else None,
            }
        )
    sig = [r["signal"] for r in rows]
    out = {
        "run": str(args.run),
        "data": str(args.data),
        "image_size": size[0],
        "seed": cfg.seed,
        "spearman_signal_vs_test_image_auroc": float(spearmanr(sig, [r["test_image_auroc"] for r in rows]).statistic),
        "argmax": val["none"].best.name(),
        "tie_break": val["density"].best.name(),
        "tie": val["density"].tie,
        "test_best_image_auroc_for_reference": max(rows, key=lambda r: r["test_image_auroc"])["recipe"],
        "rows": rows,
        "note": "test figures use the test good images for the fusion norms; reported only, nothing chosen on them",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for r in rows[:12]:
        px = "n/a" if r["test_pixel_auroc"] is None else f"{r['test_pixel_auroc']:.3f}"
        print(f"{r['recipe']:30s} signal {r['signal']:.4f}  test image {r['test_image_auroc']:.3f} pixel {px}")
    print(
        "arg-max:",
        out["argmax"],
        "| tie break:",
        out["tie_break"],
        "| spearman",
        round(out["spearman_signal_vs_test_image_auroc"], 3),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
