"""Would the validation signal choose PatchCore's local aggregation (k x k feature averaging before the Gaussian)?

``head_variants.py --mode aggregate`` found, with *test* figures, that averaging the teacher's features over 3 x 3
before the per-position Gaussian lifts magnetic_tile pixel AUROC (256 px 0.748 -> 0.794) but costs kolektorsdd
0.05-0.07 AUPRO. It could only enter the default as one more candidate that the validation signal picks, and only
if the signal, from held-out good images and their synthetic defects alone, picks it where it helps (magnetic_tile)
and refuses it where it hurts (kolektorsdd). This script measures exactly that, before anything is built:

- the run's own preparation (:func:`training.train.prepare`: split, feature cache, synthetic defects, selector) at
  the default recipe's input shape, seed by seed;
- three density maps on the validation images: the Gaussian at k = 1 (today), at k = 3, and their 50/50 blend in
  units of their spread on the good validation images (as the RD / density fusion does);
- the validation signal of each, and the paired gain over k = 1 with its bootstrap standard error
  (:meth:`Selector.paired_gain`; the centring rule adopts a gain only above one standard error);
- for the diagnosis only, each map's test figures (image AUROC by the map's max, pixel AUROC, AUPRO).

    python benchmarks/aggregate_signal.py ../shared/datasets/magnetic_tile 256 --seeds 0 1 2

``--max-images`` (default 200, the peers' protocol and ``benchmarks/detection.py``'s): the first rows of
2026-12-04 ran with every train/good image (762 / 278 / 471, 90% of them fitted): column "train images" says
"all" there.

Appends to ``benchmarks/results/aggregate_signal.jsonl`` and rewrites ``aggregate_signal.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fusion_diagnosis import feats_of

from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.data import discover
from training.metrics import aupro, auroc
from training.scoring import DensityHead, UpBlur, aggregate_features
from training.selection import _norm
from training.train import prepare, resolve_shape

RESULTS = Path(__file__).resolve().parent / "results"
MAPS = ("k1", "k3", "blend")


def _num(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


@torch.no_grad()
def run(data: Path, px: int, seed: int, max_images: int | None) -> dict:
    over = {"data.image_size": px, "seed": seed, "selection.knn_coreset": 0, "data.max_images": max_images}
    cfg = resolve_shape(load_train_config(None, over), data)
    hw = cfg.data.input_hw()
    teacher = build_model(load_train_config(None, {**over, "model.projection": "identity"})).eval().teacher
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fz = prepare(cfg, data, teacher, torch.device("cpu"), Path(tmp), progress=False)
        train = [torch.as_tensor(np.asarray(f)).float() for f in fz.train_fs.feats]
    prep_s = time.perf_counter() - t0
    sel, g1_head = fz.selector, fz.density
    assert sel is not None and g1_head is not None
    n_good = len(sel.good)
    channels = get_spec(cfg.model.backbone).channels
    g3_head = DensityHead(channels, hw, cfg.selection.density_dims).fit(aggregate_features(train, 3))

    def head_k3(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
        return g3_head.gaussian(*aggregate_features([f1, f2, f3], 3))

    val = {"k1": sel.blurred(g1_head.gaussian), "k3": sel.blurred(head_k3)}
    n1, n3 = _norm(val["k1"][:n_good]), _norm(val["k3"][:n_good])
    val["blend"] = 0.5 * (val["k1"] - n1[0]) / n1[1] + 0.5 * (val["k3"] - n3[0]) / n3[1]
    row: dict = {"data": data.name, "px": px, "hw": list(hw), "seed": seed, "max_images": max_images}
    row.update(n_train=len(fz.train_samples), n_val=n_good)
    for name in MAPS:
        detail: dict = {}
        row[f"signal_{name}"] = round(sel.map_signal(val[name], detail), 4)
        row[f"val_pixel_auroc_{name}"] = _num(detail.get("pixel_auroc"))
        if name != "k1":
            gain, se = sel.paired_gain(val["k1"], val[name])
            row[f"gain_{name}"], row[f"se_{name}"] = round(gain, 4), round(se, 4)

    # Test figures: a diagnosis only, never used to choose anything.
    sp = discover(data, cfg.data.val_fraction, seed, need_test=True, max_images=cfg.data.max_images)
    has_masks = all(s.mask is not None for s in sp.test if s.label == 1)
    te, masks = feats_of(teacher, sp.test, hw, get_spec(cfg.model.backbone), has_masks)
    labels = np.array([s.label for s in sp.test])
    upblur = UpBlur(hw, cfg.model.sigma)

    def test_map(head) -> torch.Tensor:
        return upblur(torch.cat([head(*(f[i : i + 16] for f in te)) for i in range(0, len(labels), 16)]), False)

    tmaps = {"k1": test_map(g1_head.gaussian), "k3": test_map(head_k3)}
    tmaps["blend"] = 0.5 * (tmaps["k1"] - n1[0]) / n1[1] + 0.5 * (tmaps["k3"] - n3[0]) / n3[1]
    for name in MAPS:
        amap = tmaps[name][:, 0].numpy()
        img = _num(auroc(amap.reshape(len(amap), -1).max(1), labels))
        if masks is None:
            row[f"test_{name}"] = [img, None, None]
        else:
            row[f"test_{name}"] = [img, _num(auroc(amap[:, ::2, ::2], masks[:, ::2, ::2])), _num(aupro(amap, masks))]
    row["prepare_s"] = round(prep_s, 1)
    row["date"] = time.strftime("%Y-%m-%d")
    return row


def table() -> None:
    rows = [json.loads(s) for s in (RESULTS / "aggregate_signal.jsonl").read_text().splitlines() if s.strip()]
    out = [
        "# Would the validation signal choose 3 x 3 feature aggregation? (`benchmarks/aggregate_signal.py`)",
        "",
        "Validation signal (held-out good images + synthetic defects, the run's own selector) of the Gaussian",
        "density map at k = 1, k = 3 and their 50/50 blend; gain over k = 1 +- its bootstrap standard error.",
        "Test figures (image AUROC by max / pixel AUROC / AUPRO) are a diagnosis only.",
        "",
        "| data | hw | train images | seed | signal k1 | k3 gain +- se | blend gain +- se | test k1 | test k3 | "
        "test blend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def t(v: list) -> str:
            return " / ".join("n/a" if x is None else f"{x:.3f}" for x in v)

        out.append(
            f"| {r['data']} | {r['hw'][0]}x{r['hw'][1]} | {r.get('n_train', 'all')} | {r['seed']} | "
            f"{r['signal_k1']:.4f} | "
            f"{r['gain_k3']:+.4f} +- {r['se_k3']:.4f} | {r['gain_blend']:+.4f} +- {r['se_blend']:.4f} | "
            f"{t(r['test_k1'])} | {t(r['test_k3'])} | {t(r['test_blend'])} |"
        )
    (RESULTS / "aggregate_signal.md").write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("px", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-images", type=int, default=200, help="train/good images at most (the peers' protocol)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    for seed in a.seeds:
        row = run(a.data.resolve(), a.px, seed, a.max_images)
        print(json.dumps(row), flush=True)
        with (RESULTS / "aggregate_signal.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        table()


if __name__ == "__main__":
    main()
