"""Which synthetic-defect kinds make up the validation signal of trained runs (RD vs RD-E diagnosis, issue 11).

For each run folder: the validation images it kept aside, the same synthetic defects the selection made from them
(:func:`training.synthetic.synthesize`, same seed), scored with the run's chosen checkpoint and recipe; image AUROC
(good vs that kind) and pixel AUROC (that kind's masks) per kind. RD-E trains on Perlin masks filled with other
images' texture, which is close to the selection's ``texture`` kind: this shows whether its signal comes from there.
Validation images only; the test set is not read.

    python benchmarks/rde_signal_kinds.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/rde_signal_kinds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.backbones import get_spec
from training.build import load_model
from training.features import load_readable
from training.metrics import auroc
from training.scoring import build_scoring
from training.synthetic import synthesize
from training.train import from_unit_rgb, to_unit_rgb


@torch.no_grad()
def _score(model: Any, scoring: Any, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(x), batch):
        feats, recon = model(torch.from_numpy(x[i : i + batch]))
        amap, score = scoring(feats, recon)
        maps.append(amap[:, 0].numpy())
        scores.append(score.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def kinds_of(run: Path) -> dict[str, Any]:
    """Per-kind image and pixel AUROC of one run's chosen checkpoint on its validation synthetic defects."""
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    size = cfg.data.input_hw()
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, size, cfg.model.sigma)
    from training.data import Sample

    samples = [Sample(Path(p)) for p in ckpt["split"]["val"]]
    val_np, _, _ = load_readable(samples, size, spec.mean, spec.std)
    synth01, masks, kinds = synthesize(
        to_unit_rgb(val_np, spec.mean, spec.std), cfg.selection.synthetic_per_image, cfg.seed
    )
    good_maps, good_scores = _score(model, scoring, val_np)
    syn_maps, syn_scores = _score(model, scoring, from_unit_rgb(synth01, spec.mean, spec.std))
    out: dict[str, Any] = {"run": str(run), "objective": cfg.model.objective, "recipe": scoring.recipe.name()}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        labels = np.r_[np.zeros(len(good_scores), int), np.ones(len(idx), int)]
        img = auroc(np.r_[good_scores, syn_scores[idx]], labels)
        pix_scores = np.concatenate([good_maps.ravel(), syn_maps[idx].ravel()])
        pix_labels = np.concatenate([np.zeros(good_maps.size, bool), masks[idx].ravel()])
        out[kind] = {"n": len(idx), "image_auroc": img, "pixel_auroc": auroc(pix_scores, pix_labels)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [kinds_of(r) for r in args.runs]
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    for r in rows:
        cells = ", ".join(
            f"{k} img {v['image_auroc']:.3f} px {v['pixel_auroc']:.3f}" for k, v in r.items() if isinstance(v, dict)
        )
        print(f"{Path(r['run']).name}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
