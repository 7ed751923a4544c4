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
- ``aggregate``: PatchCore's local aggregation of the *features* before the Gaussian: each teacher map (f1, f2, f3)
  averaged over a ``k x k`` window (stride 1, zero padding not counted), then the usual embed / fit / map; k = 1 is
  the baseline. A wider receptive field per position, for large defects (magnetic_tile ``uneven``, ``fray``).
- ``flip``: the Gaussian fitted on the training images plus their horizontal, vertical and both-ways flips (4x the
  samples per position for the 64-dim covariance), scored on the unflipped test images; the *image* is flipped
  before the teacher (flipping the feature maps would assume a flip-equivariant network, which the teacher is not).
  Rows at k = 1 and k = 3 (``aggregate`` combined with the flips). ``flip_extract_s``: the teacher's extra time on
  the flipped copies.

``aggregate`` and ``flip`` take ``--hw HxW`` for a non-square input (kolektorsdd at its own aspect, as
``training.data.input_shape`` gives: 192x96 at 128 px, 416x160 at 256 px).

    python benchmarks/head_variants.py basis ../shared/datasets/magnetic_tile 256
    python benchmarks/head_variants.py centre ../shared/datasets/kolektorsdd 128
    python benchmarks/head_variants.py flip ../shared/datasets/kolektorsdd 128 --hw 192x96

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
from fusion_diagnosis import feats_of
from head_diagnosis import Frozen, coreset, frozen_features, head_map, knn_map, pc_embed, spread
from torch.utils.data import DataLoader

from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.data import ImageDataset, discover
from training.metrics import aupro, auroc
from training.scoring import Blur, DensityHead, aggregate_features
from training.train import collate

RESULTS = Path(__file__).resolve().parent / "results"
SHRINKS = (0.01, 0.1, 0.3, 1.0, "lw")
POOLS = ((1, "cov"), (3, "cov"), (5, "cov"), (3, "both"), (5, "both"))
BASES = (("top", 64), ("bottom", 64), ("mixed", 64), ("random", 64), ("top", 100), ("bottom", 32), ("bottom", 100))
AGGREGATES = (1, 3, 5)
FLIPS = ((3,), (2,), (2, 3))  # horizontal, vertical, both: flipped axes of an (N, C, H, W) image batch


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


def aggregate(feats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """:func:`training.scoring.aggregate_features` of the maps in float32 (``k = 1``: the maps unchanged)."""
    return feats if k == 1 else aggregate_features([f.float() for f in feats], k)


@torch.no_grad()
def frozen_at(data: Path, px: int, hw: tuple[int, int], flips: bool) -> tuple[Frozen, list[torch.Tensor], dict]:
    """:func:`head_diagnosis.frozen_features` at a ``(height, width)`` input, plus (when ``flips``) the teacher's
    features of the training images' flipped copies ``FLIPS`` (``(3N, C_k, h, w)`` per scale, ``[]`` otherwise) and
    the teacher's seconds on the training images and on their flips."""
    cfg = load_train_config(None, {"data.image_size": px, "model.projection": "identity"})
    teacher = build_model(cfg).eval().teacher
    spec = get_spec(cfg.model.backbone)
    sp = discover(data, 0.1, 0, need_test=True, max_images=200)
    t0 = time.perf_counter()
    tr, _ = feats_of(teacher, sp.train, hw, spec, False)
    times = {"train_extract_s": round(time.perf_counter() - t0, 1)}
    va, _ = feats_of(teacher, sp.val, hw, spec, False)
    te, masks = feats_of(teacher, sp.test, hw, spec, True)
    fz = Frozen(spec, hw, tr, va, te, masks, np.array([s.label for s in sp.test]))
    if not flips:
        return fz, [], times
    t0 = time.perf_counter()
    ds = ImageDataset(sp.train, hw, spec.mean, spec.std, skip_unreadable=False)
    out: list[list[torch.Tensor]] = []
    for b in DataLoader(ds, batch_size=16, collate_fn=collate):
        out += [[f.clone() for f in teacher(b["image"].flip(axes))] for axes in FLIPS]
    times["flip_extract_s"] = round(time.perf_counter() - t0, 1)
    return fz, [torch.cat([o[k] for o in out]) for k in range(3)], times


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
def run_aggregate(study: str, data: Path, px: int, hw: tuple[int, int]) -> list[dict]:
    """The ``aggregate`` (k in ``AGGREGATES``) or ``flip`` (k = 1 and 3 on the flip-augmented training set) rows."""
    fz, flipped, times = frozen_at(data, px, hw, study == "flip")
    blur = Blur(hw, 4.0)
    rows: list[dict] = []
    for k in AGGREGATES if study == "aggregate" else (1, 3):
        tr = aggregate(fz.train, k)
        if flipped:
            tr = [torch.cat([a, b]) for a, b in zip(tr, aggregate(flipped, k), strict=True)]
        t0 = time.perf_counter()
        head = DensityHead(fz.spec.channels, hw, 64).fit(tr)
        fit_s = round(time.perf_counter() - t0, 1)
        d = head_map(head, aggregate(fz.test, k))
        amap = blur(F.interpolate(d, size=hw, mode="bilinear", align_corners=False))[:, 0].numpy()
        what = {"hw": list(hw), "aggregate": k, "flips": "h,v,hv" if flipped else "none", "n_fit": len(tr[0])}
        rows.append(_row(data, px, amap, fz.masks, fz.labels, **what, fit_s=fit_s, **times))
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def run(study: str, data: Path, px: int, ratio: float = 0.01, hw: tuple[int, int] | None = None) -> list[dict]:
    if study in ("aggregate", "flip"):
        return run_aggregate(study, data, px, hw or (px, px))
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
        "neighbourhood statistics (`fit(window=w)`); covariance shrinkage; local aggregation of the features "
        "(k x k mean) before the Gaussian, with and without flipped training copies (h, v, hv: images flipped "
        "before the teacher; fit s: the Gaussian's fit, flip s: the teacher on the flipped copies).",
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
        (
            "aggregate",
            "input (h x w) | k | flips | images fitted",
            lambda r: ["{} x {}".format(*r["hw"]), r["aggregate"], r["flips"], r["n_fit"]],
        ),
    ]
    for key, head, cells in sections:
        timed = key == "aggregate"
        n = head.count("|") + 1 + 2 * timed
        tail = " | fit s | flip s" if timed else ""
        out += [f"| dataset | px | {head} | image AUROC | pixel AUROC | AUPRO{tail} |", "|---" * (n + 5) + "|"]
        out += [
            "| "
            + " | ".join(str(c) for c in [r["data"], r["px"], *cells(r)])
            + f" | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} | {_f(r['aupro'])} |"
            + (f" {r['fit_s']} | {r.get('flip_extract_s', '-')} |" if timed else "")
            for r in rows
            if key in r
        ]
        out.append("")
    (RESULTS / "head_variants.md").write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("basis", "centre", "pool", "shrink", "aggregate", "flip", "table"))
    ap.add_argument("data", type=Path, nargs="?")
    ap.add_argument("px", type=int, nargs="?", default=128)
    ap.add_argument("--hw", help="HxW input for aggregate / flip (e.g. 192x96); default px x px")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.study != "table":
        if args.data is None:
            ap.error("a dataset folder is needed")
        hw = None
        if args.hw is not None:
            if args.study not in ("aggregate", "flip"):
                ap.error("--hw is for the aggregate and flip studies")
            h, w = (int(v) for v in args.hw.lower().split("x"))
            hw = (h, w)
        rows = run(args.study, args.data, args.px, hw=hw)
        with open(RESULTS / "head_variants.jsonl", "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    table()


if __name__ == "__main__":
    main()
