"""Diagnosis (reported, never used in a run): what the fusion of the RD map with the density head depends on.

``norms RUN DATA [RUN DATA ...]``: for each trained run's best checkpoint and chosen recipe, the test figures of the
same fusion under several estimators of the maps' normalisation (``rd_norm``/``density_norm``: median and
q99 - median of the good validation pixels today; per-image quantiles; std; image maxima; density out of sample on
the training images by 5-fold refits; and, as an oracle, the test good images), the bootstrap standard error of
each estimator's log scale ratio over the validation images, and a sweep of the density weight 0 / 0.5 / 0.75 / 0.9
/ 1 under today's norms. ``density DATA SIZE``: the training-free density head alone at stride 8 (ours) and stride
4 (PaDiM's), 64 and 100 PCA dimensions. Results: ``benchmarks/results/fusion_diagnosis.{json,md}``.

    python benchmarks/fusion_diagnosis.py norms out.json RUN_DIR ../shared/datasets/kolektorsdd
    python benchmarks/fusion_diagnosis.py density ../shared/datasets/kolektorsdd 128 out.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from training.backbones import get_spec
from training.build import build_model, load_model
from training.config import load_train_config
from training.data import ImageDataset, discover
from training.metrics import aupro, auroc
from training.scoring import AnomalyScorer, Blur, ChannelStats, DensityHead, build_scoring
from training.train import collate

torch.set_num_threads(2)


@torch.no_grad()
def maps_for(model, scorer, density, blur, size, samples, spec, with_masks):
    ds = ImageDataset(samples, size, spec.mean, spec.std, skip_unreadable=False, with_masks=with_masks)
    rd, dn, feats_all, masks = [], [], [], []
    for b in DataLoader(ds, batch_size=16, collate_fn=collate):
        feats, recon = model(b["image"])
        rd.append(scorer(*feats, *recon)[0][:, 0])
        d = F.interpolate(density(*feats), size=size, mode="bilinear", align_corners=False)
        dn.append(blur(d)[:, 0])
        feats_all.append([f.clone() for f in feats])
        if with_masks:
            masks.append(b["mask"].numpy())
    feats = [torch.cat([f[k] for f in feats_all]) for k in range(3)]
    return torch.cat(rd).numpy(), torch.cat(dn).numpy(), feats, (np.concatenate(masks) if with_masks else None)


def q(x, qs):
    return np.quantile(x.ravel()[:: max(1, x.size // 2_000_000)], qs)


EST = {
    "pooled_q99": lambda m: (q(m, 0.5), q(m, 0.99) - q(m, 0.5)),
    "pooled_q95": lambda m: (q(m, 0.5), q(m, 0.95) - q(m, 0.5)),
    "pooled_iqr": lambda m: (q(m, 0.5), q(m, 0.75) - q(m, 0.25)),
    "pooled_std": lambda m: (q(m, 0.5), float(m.std())),
    "perimg_q99": lambda m: (
        float(np.median(np.median(m.reshape(len(m), -1), 1))),
        float(np.median(np.quantile(m.reshape(len(m), -1), 0.99, 1) - np.median(m.reshape(len(m), -1), 1))),
    ),
    "imgmax_std": lambda m: (q(m, 0.5), float(m.reshape(len(m), -1).max(1).std())),
    "imgmax_med": lambda m: (q(m, 0.5), float(np.median(m.reshape(len(m), -1).max(1)) - q(m, 0.5))),
}


def norms_main(run: str, data: str) -> dict:
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    size = cfg.data.input_hw()
    sc = build_scoring(ckpt.get("scoring"), spec.channels, size, cfg.model.sigma)
    r = sc.recipe
    if sc.density is None:
        return {"run": run, "recipe": r.name(), "skip": "no density"}
    stats = ChannelStats(spec.channels)
    if r.standardize:
        stats.load_state_dict(ckpt["scoring"]["stats"])
    raw = replace(r, density_weight=0.0, rd_norm=(0.0, 1.0), density_norm=(0.0, 1.0))
    scorer = AnomalyScorer(size, cfg.model.sigma, raw, stats if r.standardize else None).eval()
    blur = Blur(size, cfg.model.sigma)
    splits = discover(data, cfg.data.val_fraction, cfg.seed, need_test=True, max_images=cfg.data.max_images)
    val_rd, val_d, _, _ = maps_for(model, scorer, sc.density, blur, size, splits.val, spec, False)
    test = splits.test
    has_masks = all(s.mask is not None for s in test if s.label == 1)
    t_rd, t_d, _, t_m = maps_for(model, scorer, sc.density, blur, size, test, spec, has_masks)
    labels = np.array([s.label for s in test])
    good = labels == 0
    # out-of-sample density on training images (5 folds) + in-sample RD on training images
    tr_rd, _, tr_feats, _ = maps_for(model, scorer, sc.density, blur, size, splits.train, spec, False)
    n = len(splits.train)
    oos = np.zeros_like(tr_rd)
    folds = np.arange(n) % 5
    for k in range(5):
        dh = DensityHead(spec.channels, size, sc.density.dims).fit([f[folds != k] for f in tr_feats])
        with torch.no_grad():
            d = F.interpolate(dh(*[f[folds == k] for f in tr_feats]), size=size, mode="bilinear", align_corners=False)
            oos[folds == k] = blur(d)[:, 0].numpy()
    a = r.density_weight

    def test_metrics(rn, dnm, a=a):
        m = (1 - a) * (t_rd - rn[0]) / rn[1] + a * (t_d - dnm[0]) / dnm[1]
        flat = m.reshape(len(m), -1)
        if r.reduction == "max":
            s = flat.max(1)
        else:
            k = max(1, int(round(r.topk * flat.shape[1])))
            s = np.sort(flat, 1)[:, -k:].mean(1)
        out = {"img": auroc(s, labels)}
        if has_masks:
            out["px"] = auroc(m[:, ::2, ::2], t_m[:, ::2, ::2])
        return out

    res = {"run": run, "recipe": r.name(), "stored_rd_norm": r.rd_norm, "stored_d_norm": r.density_norm, "est": {}}
    rng = np.random.default_rng(0)
    nv = len(val_rd)
    for name, f in EST.items():
        rn, dnm = f(val_rd), f(val_d)
        ratio = rn[1] / dnm[1]
        boots = []
        for _ in range(30):
            i = rng.integers(0, nv, nv)
            boots.append(np.log(f(val_rd[i])[1] / f(val_d[i])[1]))
        orn, odn = f(t_rd[good]), f(t_d[good])
        e = {
            "val_ratio": float(ratio),
            "se_log_ratio": float(np.std(boots)),
            "oracle_ratio": float(orn[1] / odn[1]),
            "val": test_metrics(rn, dnm),
            "oracle_testgood": test_metrics(orn, odn),
        }
        # density from out-of-sample training + val, RD from val
        d_all = np.concatenate([oos, val_d])
        e["oos_density"] = test_metrics(rn, f(d_all))
        e["oos_ratio"] = float(rn[1] / f(d_all)[1])
        e["train_rd_insample_ratio"] = float(f(np.concatenate([tr_rd, val_rd]))[1] / f(d_all)[1])
        e["train_insample_rd"] = test_metrics(f(np.concatenate([tr_rd, val_rd])), f(d_all))
        res["est"][name] = e
    res["a_sweep_val_q99"] = {
        str(aa): test_metrics(EST["pooled_q99"](val_rd), EST["pooled_q99"](val_d), aa) for aa in (0, 0.5, 0.75, 0.9, 1)
    }
    return res


class Dens4(DensityHead):
    def __init__(self, channels, image_size, dims=64):
        super().__init__(channels, image_size, dims)
        self.grid = (image_size[0] // 4, image_size[1] // 4)
        p = self.grid[0] * self.grid[1]
        self.register_buffer("mean", torch.zeros(self.dims, p))
        self.register_buffer("chol", torch.eye(self.dims).expand(p, -1, -1).clone())

    def embed(self, f1, f2, f3):
        g = self.grid
        x = torch.cat(
            [
                f1,
                F.interpolate(f2, size=g, mode="bilinear", align_corners=False),
                F.interpolate(f3, size=g, mode="bilinear", align_corners=False),
            ],
            dim=1,
        )
        return x.flatten(2)


@torch.no_grad()
def feats_of(teacher, samples, size, spec, masks):
    ds = ImageDataset(samples, size, spec.mean, spec.std, skip_unreadable=False, with_masks=masks)
    out, ms = [], []
    for b in DataLoader(ds, batch_size=16, collate_fn=collate):
        out.append([f.clone() for f in teacher(b["image"])])
        if masks:
            ms.append(b["mask"].numpy())
    return [torch.cat([o[k] for o in out]) for k in range(3)], (np.concatenate(ms) if masks else None)


def density_main(data, size_px, out):
    cfg = load_train_config(None, {"data.image_size": size_px, "model.projection": "identity"})
    model = build_model(cfg).eval()
    spec = get_spec(cfg.model.backbone)
    size = (size_px, size_px)
    sp = discover(data, 0.1, 0, need_test=True, max_images=200)
    tr, _ = feats_of(model.teacher, sp.train, size, spec, False)
    test = sp.test
    has_m = all(s.mask is not None for s in test if s.label == 1)
    te, m = feats_of(model.teacher, test, size, spec, has_m)
    labels = np.array([s.label for s in test])
    blur = Blur(size, 4.0)
    res = []
    for cls, dims in ((DensityHead, 64), (Dens4, 64), (DensityHead, 100), (Dens4, 100)):
        t0 = time.time()
        h = cls(spec.channels, size, dims).fit(tr)
        with torch.no_grad():
            d = torch.cat([h(*(f[i : i + 16] for f in te)) for i in range(0, len(test), 16)])
            amap = blur(F.interpolate(d, size=size, mode="bilinear", align_corners=False))[:, 0].numpy()
        s = amap.reshape(len(amap), -1).max(1)
        r = {
            "data": data,
            "px": size_px,
            "stride": 4 if cls is Dens4 else 8,
            "dims": h.dims,
            "img": auroc(s, labels),
            "s": round(time.time() - t0, 1),
        }
        if has_m:
            r["pix"] = auroc(amap[:, ::2, ::2], m[:, ::2, ::2])
            r["aupro"] = aupro(amap, m)
        print(r, flush=True)
        res.append(r)
    with open(out, "a") as fh:
        for r in res:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "density":
        density_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    assert sys.argv[1] == "norms", "usage: fusion_diagnosis.py norms OUT RUN DATA [...] | density DATA SIZE OUT"
    out = [norms_main(run, data) for run, data in zip(sys.argv[3::2], sys.argv[4::2], strict=True)]
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1, default=float))
