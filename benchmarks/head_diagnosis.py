"""Diagnosis (reported, never used in a run): which training-free head could close the pixel-metric gap to the peers.

On magnetic_tile rdedge's default is below PatchCore's pixel AUROC (0.785) and PaDiM's AUPRO (0.736), and level with
them on image AUROC. This measures, on the frozen lite0 teacher with test figures (so nothing here may choose a
setting in a run):

- ``gauss8``: rdedge's density head (per-position Gaussian, stride 8, PCA 64), the map blurred at sigma 1 / 2 / 4 / 8
  (the RD and PaDiM default is 4 at 256 px; at 128 px the same sigma is twice as wide relative to the part);
- ``gauss4``: the same head at PaDiM's stride 4;
- ``knn8``: a position-free PatchCore-style head (stride-8 + stride-16 features, 3x3 local averaging, greedy
  coreset of ``ratio`` of the training patches on a random 128-d projection, nearest-neighbour distance);
- ``fuse knnA``: ``(1 - A) * gauss8 + A * knn8``, each map in units of its spread on the held-out good validation
  images (median, q99 - median), as the product's own fusion does.

    python benchmarks/head_diagnosis.py ../shared/datasets/magnetic_tile 128 [--ratio 0.05]

Appends to ``benchmarks/results/head_diagnosis.jsonl``; ``--table`` rewrites ``head_diagnosis.md`` from it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fusion_diagnosis import Dens4, feats_of

from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.data import discover
from training.metrics import aupro, auroc
from training.scoring import Blur, DensityHead

RESULTS = Path(__file__).resolve().parent / "results"


def pc_embed(f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """PatchCore's patch features at stride 8: 3x3-averaged stride-8 and upsampled stride-16 maps, concatenated."""
    g = (f2.shape[-2], f2.shape[-1])
    f3 = F.interpolate(F.avg_pool2d(f3.float(), 3, 1, 1), size=g, mode="bilinear", align_corners=False)
    return torch.cat([F.avg_pool2d(f2.float(), 3, 1, 1), f3], 1)


def coreset(bank: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Greedy k-centre subset of ``bank`` rows (PatchCore's), distances on a random 128-d projection."""
    g = torch.Generator().manual_seed(seed)
    z = bank @ (torch.randn(bank.shape[1], 128, generator=g) / 128**0.5)
    n2 = (z * z).sum(1)
    i = int(torch.randint(len(z), (1,), generator=g))
    idx = [i]
    mind = n2 - 2 * (z @ z[i]) + n2[i]
    for _ in range(n - 1):
        i = int(torch.argmax(mind))
        idx.append(i)
        mind = torch.minimum(mind, n2 - 2 * (z @ z[i]) + n2[i])
    return bank[idx]


def knn_map(bank: torch.Tensor, feats: list[torch.Tensor], batch: int = 16) -> torch.Tensor:
    """Nearest-neighbour distance of every stride-8 patch to ``bank``: ``(N, 1, H/8, W/8)``."""
    out, b2 = [], (bank * bank).sum(1)
    for i in range(0, len(feats[0]), batch):
        q = pc_embed(feats[1][i : i + batch], feats[2][i : i + batch])
        b, _, h, w = q.shape
        qf = q.permute(0, 2, 3, 1).reshape(-1, q.shape[1])
        d2 = (qf * qf).sum(1, keepdim=True) - 2 * qf @ bank.T + b2
        out.append(d2.clamp_min(0).min(1).values.sqrt().view(b, 1, h, w))
    return torch.cat(out)


def head_map(head: DensityHead, feats: list[torch.Tensor], batch: int = 16) -> torch.Tensor:
    return torch.cat([head(*(f[i : i + batch] for f in feats)) for i in range(0, len(feats[0]), batch)])


def spread(maps: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(maps.flatten()[::7], torch.tensor([0.5, 0.99]))
    return float(q[0]), max(float(q[1] - q[0]), 1e-6)


@dataclass
class Frozen:
    """The frozen lite0 teacher's features of one set at one size (200 training images, 10% held out, seed 0)."""

    spec: Any
    size: tuple[int, int]
    train: list[torch.Tensor]
    val: list[torch.Tensor]
    test: list[torch.Tensor]
    masks: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def frozen_features(data: Path, px: int) -> Frozen:
    cfg = load_train_config(None, {"data.image_size": px, "model.projection": "identity"})
    teacher = build_model(cfg).eval().teacher
    spec = get_spec(cfg.model.backbone)
    size = (px, px)
    sp = discover(data, 0.1, 0, need_test=True, max_images=200)
    tr, _ = feats_of(teacher, sp.train, size, spec, False)
    va, _ = feats_of(teacher, sp.val, size, spec, False)
    te, masks = feats_of(teacher, sp.test, size, spec, True)
    return Frozen(spec, size, tr, va, te, masks, np.array([s.label for s in sp.test]))


@torch.no_grad()
def run(data: Path, px: int, ratio: float) -> list[dict]:
    fz = frozen_features(data, px)
    spec, size, tr, va, te, masks, labels = fz.spec, fz.size, fz.train, fz.val, fz.test, fz.masks, fz.labels

    def up(d: torch.Tensor) -> torch.Tensor:
        return F.interpolate(d, size=size, mode="bilinear", align_corners=False)

    rows: list[dict] = []

    def record(head: str, pre_blur: torch.Tensor, sigma: float, t0: float) -> None:
        amap = Blur(size, sigma)(pre_blur)[:, 0].numpy()
        row = {
            "data": data.name,
            "px": px,
            "head": head,
            "sigma": sigma,
            "image_auroc": round(auroc(amap.reshape(len(amap), -1).max(1), labels), 4),
            "pixel_auroc": round(auroc(amap[:, ::2, ::2], masks[:, ::2, ::2]), 4),
            "aupro": round(aupro(amap, masks), 4),
            "fit_s": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(row, flush=True)
        rows.append(row)

    t0 = time.time()
    gauss = DensityHead(spec.channels, size, 64).fit(tr)
    g_val, g_test = up(head_map(gauss, va)), up(head_map(gauss, te))
    for sigma in (1.0, 2.0, 4.0, 8.0):
        record("gauss8", g_test, sigma, t0)
    t0 = time.time()
    record("gauss4", up(head_map(Dens4(spec.channels, size, 64).fit(tr), te)), 4.0, t0)
    t0 = time.time()
    x = pc_embed(tr[1], tr[2])
    bank = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    bank = coreset(bank, max(1, int(ratio * len(bank))))
    k_val, k_test = up(knn_map(bank, va)), up(knn_map(bank, te))
    record(f"knn8 coreset {ratio:g} ({len(bank)})", k_test, 4.0, t0)
    (gl, gs), (kl, ks) = spread(g_val), spread(k_val)
    for a in (0.25, 0.5, 0.75):
        record(f"fuse knn{a:g}", (1 - a) * (g_test - gl) / gs + a * (k_test - kl) / ks, 4.0, time.time())
    return rows


def table() -> None:
    rows = [json.loads(line) for line in (RESULTS / "head_diagnosis.jsonl").read_text().splitlines() if line]
    out = [
        "# Training-free heads on the frozen lite0 teacher (test figures: a diagnosis, never a choice in a run)",
        "",
        "`benchmarks/head_diagnosis.py`, 200 training images, 10% held out for the fusion norms, seed 0. Raw: "
        "head_diagnosis.jsonl. Better peer (256 px): magnetic_tile 0.898 / 0.785 / 0.736, kolektorsdd 0.738 / "
        "0.874 / 0.417.",
        "",
        "| dataset | px | head | sigma | image AUROC | pixel AUROC | AUPRO | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['data']} | {r['px']} | {r['head']} | {r['sigma']:g} | {r['image_auroc']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['fit_s']} |"
        )
    (RESULTS / "head_diagnosis.md").write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?")
    ap.add_argument("px", type=int, nargs="?", default=128)
    ap.add_argument("--ratio", type=float, default=0.05, help="coreset fraction of the training patches")
    ap.add_argument("--table", action="store_true", help="only rewrite head_diagnosis.md from the jsonl")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.data is not None:
        rows = run(args.data, args.px, args.ratio)
        with open(RESULTS / "head_diagnosis.jsonl", "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    table()


if __name__ == "__main__":
    main()
