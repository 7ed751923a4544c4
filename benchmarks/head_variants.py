"""Diagnosis (reported, never used in a run): two more ways the training-free density head might close the
magnetic_tile pixel-metric gap, measured with test figures on the frozen lite0 teacher.

- ``basis``: which PCA directions the per-position Gaussian keeps. rdedge keeps the ``dims`` directions of largest
  variance; Rippel et al. (2020, "Modeling the distribution of normal data in pre-trained deep features") found the
  *smallest*-variance directions the most telling for a Mahalanobis score. Rows: top / bottom / mixed (half each) /
  random channels (PaDiM's choice, no PCA), at 32, 64 or 100 dimensions.
- ``centre``: each image's map minus its own median (or 25th percentile) before scoring, for the Gaussian, the kNN
  head (1% coreset) and their 50/50 blend: a global threshold then no longer sees image-to-image level shifts.
- ``pool``: each position's Gaussian fitted on the statistics of its ``w x w`` grid neighbourhood
  (``DensityHead.fit(window=w)``): only the covariance (``cov``: more samples for a 64-dim covariance from ~180
  images) or mean and covariance (``both``: tolerant of parts that shift between images).

    python benchmarks/head_variants.py basis ../shared/datasets/magnetic_tile 256
    python benchmarks/head_variants.py centre ../shared/datasets/kolektorsdd 128

Appends to ``benchmarks/results/head_variants.jsonl`` and rewrites ``head_variants.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from head_diagnosis import coreset, frozen_features, head_map, knn_map, pc_embed, spread

from training.metrics import aupro, auroc
from training.scoring import Blur, DensityHead

RESULTS = Path(__file__).resolve().parent / "results"
SHRINKS = (0.01, 0.1, 0.3, 1.0, "lw")
POOLS = ((1, "cov"), (3, "cov"), (5, "cov"), (3, "both"), (5, "both"))
BASES = (("top", 64), ("bottom", 64), ("mixed", 64), ("random", 64), ("top", 100), ("bottom", 32), ("bottom", 100))


def _eigh_keeping(mode: str, dims: int, seed: int = 0) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """An ``eigh`` whose last ``dims`` columns are the directions ``mode`` keeps (``DensityHead.fit`` keeps the last
    ``dims`` eigenvectors of its ascending ``eigh``)."""
    eigh = torch.linalg.eigh

    def ordered(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, vecs = eigh(cov)
        c = vecs.shape[1]
        if mode == "random":  # PaDiM: a random channel subset, no rotation
            perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
            return vals, torch.eye(c, dtype=vecs.dtype)[:, perm]
        order = {
            "top": torch.arange(c),
            "bottom": torch.arange(c).flip(0),
            "mixed": torch.cat(
                [
                    torch.arange(dims // 2, c - dims // 2),
                    torch.arange(dims // 2).flip(0),
                    torch.arange(c - dims // 2, c),
                ]
            ),  # fmt: skip
        }[mode]
        return vals, vecs[:, order]

    return ordered


def _num(v: float) -> float | None:
    """Rounded, or ``None`` where the set has no masks (NaN is not JSON)."""
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _row(data: Path, px: int, amap: np.ndarray, masks: np.ndarray, labels: np.ndarray, **what: object) -> dict:
    return {
        "data": data.name,
        "px": px,
        **what,
        "image_auroc": _num(auroc(amap.reshape(len(amap), -1).max(1), labels)),
        "pixel_auroc": _num(auroc(amap[:, ::2, ::2], masks[:, ::2, ::2])),
        "aupro": _num(aupro(amap, masks)),
        "date": time.strftime("%Y-%m-%d"),
    }


@torch.no_grad()
def run(study: str, data: Path, px: int, ratio: float = 0.01) -> list[dict]:
    fz = frozen_features(data, px)
    spec, size, tr, va, te, masks, labels = fz.spec, fz.size, fz.train, fz.val, fz.test, fz.masks, fz.labels
    blur = Blur(size, 4.0)

    def up(d: torch.Tensor) -> torch.Tensor:  # (N, 1, H/8, W/8) -> blurred (N, 1, H, W)
        return blur(F.interpolate(d, size=size, mode="bilinear", align_corners=False))

    rows: list[dict] = []
    if study == "basis":
        for mode, dims in BASES:
            with mock.patch("torch.linalg.eigh", _eigh_keeping(mode, dims)):
                head = DensityHead(spec.channels, size, dims).fit(tr)
            rows.append(_row(data, px, up(head_map(head, te))[:, 0].numpy(), masks, labels, basis=mode, dims=dims))
            print(rows[-1], flush=True)
        return rows
    if study == "shrink":
        for shrink in SHRINKS:
            head = DensityHead(spec.channels, size, 64).fit(tr, shrink=shrink)
            amap = up(head_map(head, te))[:, 0].numpy()
            rho = getattr(head, "lw_rho", None)
            extra = {} if rho is None else {"lw_rho_median": round(float(rho.median()), 4)}
            rows.append(_row(data, px, amap, masks, labels, shrink=shrink, **extra))
            print(rows[-1], flush=True)
        return rows
    if study == "pool":
        for window, pool in POOLS:
            t0 = time.perf_counter()
            head = DensityHead(spec.channels, size, 64).fit(tr, window=window, pool=pool)
            fit_s = round(time.perf_counter() - t0, 1)
            amap = up(head_map(head, te))[:, 0].numpy()
            rows.append(_row(data, px, amap, masks, labels, window=window, pool=pool, fit_s=fit_s))
            print(rows[-1], flush=True)
        return rows
    gauss = DensityHead(spec.channels, size, 64).fit(tr)
    gv, gt = up(head_map(gauss, va)), up(head_map(gauss, te))
    x = pc_embed(tr[1], tr[2])
    bank = coreset(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), max(1, int(ratio * x[:, 0].numel())))
    kv, kt = up(knn_map(bank, va)), up(knn_map(bank, te))
    (gl, gs), (kl, ks) = spread(gv), spread(kv)
    heads = {"gauss": (gt - gl) / gs, "knn": (kt - kl) / ks, "blend0.5": 0.5 * (gt - gl) / gs + 0.5 * (kt - kl) / ks}
    for name, m in heads.items():
        for centre in ("none", "median", "q25"):
            a = m[:, 0]
            if centre == "median":
                a = a - a.flatten(1).median(1).values.view(-1, 1, 1)
            elif centre == "q25":
                a = a - torch.quantile(a.flatten(1)[:, ::4], 0.25, dim=1).view(-1, 1, 1)
            rows.append(_row(data, px, a.numpy(), masks, labels, head=name, centre=centre))
            print(rows[-1], flush=True)
    return rows


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table() -> None:
    rows = [json.loads(line) for line in (RESULTS / "head_variants.jsonl").read_text().splitlines() if line]
    out = [
        "# Density-head variants (test figures: a diagnosis, never a choice in a run)",
        "",
        "`benchmarks/head_variants.py`: frozen lite0 teacher, 200 training images, sigma 4, seed 0. Raw: "
        "head_variants.jsonl. Better peer (256 px): magnetic_tile 0.898 / 0.785 / 0.736, kolektorsdd 0.738 / 0.874 "
        "/ 0.417. Tables: the PCA directions the Gaussian keeps; per-image centring of the map; pooled "
        "neighbourhood statistics (`fit(window=w)`); covariance shrinkage.",
        "",
    ]
    sections: list[tuple[str, str, Callable[[dict], list[object]]]] = [
        ("basis", "basis | dims", lambda r: [r["basis"], r["dims"]]),
        ("centre", "head | centring", lambda r: [r["head"], r["centre"]]),
        ("window", "window | pooled", lambda r: [r["window"], r["pool"]]),
        (
            "shrink",
            "shrinkage",
            lambda r: [str(r["shrink"]) + (f" (median rho {r['lw_rho_median']:.3f})" if "lw_rho_median" in r else "")],
        ),
    ]
    for key, head, cells in sections:
        n = head.count("|") + 1
        out += [f"| dataset | px | {head} | image AUROC | pixel AUROC | AUPRO |", "|---" * (n + 5) + "|"]
        out += [
            "| "
            + " | ".join(str(c) for c in [r["data"], r["px"], *cells(r)])
            + f" | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} | {_f(r['aupro'])} |"
            for r in rows
            if key in r
        ]
        out.append("")
    (RESULTS / "head_variants.md").write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("basis", "centre", "pool", "shrink", "table"))
    ap.add_argument("data", type=Path, nargs="?")
    ap.add_argument("px", type=int, nargs="?", default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.study != "table":
        if args.data is None:
            ap.error("a dataset folder is needed")
        rows = run(args.study, args.data, args.px)
        with open(RESULTS / "head_variants.jsonl", "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    table()


if __name__ == "__main__":
    main()
