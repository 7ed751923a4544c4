"""Diagnosis (validation images only): why the validation signal keeps the Gaussian alone over the Gaussian / kNN
blend on magnetic_tile, where the test set's pixel AUROC favours the blend (``head_diagnosis.md``).

For each kNN share of the density head (0 = Gaussian alone ... 1 = kNN alone) it prints the signal and, per synthetic
defect kind, the image and pixel AUROC it is made of, built exactly as a run builds them
(:func:`training.train.prepare`: same split, synthetic defects, norms and blur). ``--contrast c`` scales every
synthetic defect's change by ``c`` (``x + c * (defect - x)``): if the synthetic defects were merely too easy (pixel
AUROC near 1 for every head), softer ones would change the ranking. ``--centre`` scores shares 0 and 0.5 with and
without per-image centring (each map minus its own median: ``head_variants.py centre`` measures what it does on
the test sets). No test image is read.

    python benchmarks/knn_signal_kinds.py ../shared/datasets/magnetic_tile 256 --contrast 0.5

Appends to ``benchmarks/results/knn_signal_kinds.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import training.synthetic
from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.scoring import DensityHead
from training.selection import _norm
from training.train import prepare

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def run(data: Path, px: int, contrast: float, centre: bool = False, coreset: float = 0.01) -> list[dict]:
    cfg = load_train_config(None, {"data.image_size": px, "model.projection": "identity", "data.max_images": 200})
    teacher = build_model(cfg).eval().teacher
    synthesize = training.synthetic.synthesize

    def softened(images: np.ndarray, per_image: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
        out, masks, kinds = synthesize(images, per_image, seed)
        src = np.repeat(images, per_image, axis=0)
        return (src + contrast * (out - src)).astype(np.float32), masks, kinds

    with mock.patch("training.synthetic.synthesize", softened):
        frozen = prepare(cfg, data, teacher, torch.device("cpu"), Path(tempfile.mkdtemp()), False)
    sel = frozen.selector
    assert sel is not None
    # A head of its own: prepare()'s may have dropped its bank after choosing share 0.
    size = (px, px)
    rows_k = int(np.ceil(coreset * len(frozen.train_fs) * (px // 8) ** 2))
    head = DensityHead(get_spec(cfg.model.backbone).channels, size, cfg.selection.density_dims, rows_k)
    head.fit(frozen.train_fs.feats).fit_knn(frozen.train_fs.feats, seed=cfg.seed)
    n_good = len(sel.good)
    g = sel.blurred(head.gaussian)
    k = sel.blurred(lambda f1, f2, f3: head.nearest(f2, f3))
    (gl, gs), (kl, ks) = _norm(g[:n_good]), _norm(k[:n_good])
    rows = []
    settings = [(b, c) for b in (0.0, 0.5) for c in (False, True)] if centre else [(b, False) for b in SHARES]
    for b, c in settings:
        amap = (1 - b) * (g - gl) / gs + b * (k - kl) / ks
        if c:
            amap = amap - amap.flatten(1).median(1).values.view(-1, 1, 1, 1)
        fig: dict = {}
        signal = sel.map_signal(amap, fig)
        row = {"data": data.name, "px": px, "contrast": contrast, "knn_share": b, "signal": round(signal, 4)}
        row["date"] = time.strftime("%Y-%m-%d")
        if centre:
            row["centre"] = c
        row |= {kind: [round(v["image_auroc"], 3), round(v["pixel_auroc"], 3)] for kind, v in fig["per_kind"].items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("px", type=int, nargs="?", default=128)
    ap.add_argument("--contrast", type=float, default=1.0, help="scale of each synthetic defect's change (1 = as made)")
    ap.add_argument("--centre", action="store_true", help="shares 0 and 0.5, with and without per-image centring")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = run(args.data, args.px, args.contrast, args.centre)
    with open(RESULTS / "knn_signal_kinds.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
