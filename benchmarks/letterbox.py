"""Diagnosis (test figures, reported, never used in a run): parts of mixed aspect squashed into a square (what
rdedge does) against letterboxed (scaled to fit, padded to the square by reflection or edge replication, so nothing
is distorted), for the training-free Gaussian and kNN heads and their 50/50 blend on the frozen lite0 teacher.
Maps are cropped back to the content and resized to the square, so every mode is scored against the same masks.

    python benchmarks/letterbox.py ../shared/datasets/magnetic_tile 128 squash|pad|padedge

Appends to ``benchmarks/results/letterbox.jsonl``.
"""

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from head_diagnosis import coreset, head_map, knn_map, pc_embed

from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.data import discover, read_image, read_mask, resize_mask
from training.metrics import aupro, auroc
from training.scoring import Blur, DensityHead

torch.set_num_threads(2)
data = Path(sys.argv[1])
S = int(sys.argv[2])
mode = sys.argv[3]  # squash | pad | padedge
cfg = load_train_config(None, {"data.image_size": S, "model.projection": "identity"})
teacher = build_model(cfg).eval().teacher
spec = get_spec(cfg.model.backbone)
mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)


def prep(bgr):
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    if mode == "squash":
        out, box = cv2.resize(rgb, (S, S), interpolation=cv2.INTER_LINEAR), (0, 0, S, S)
    else:
        k = S / max(h, w)
        nh, nw = max(1, round(h * k)), max(1, round(w * k))
        small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        top, left = (S - nh) // 2, (S - nw) // 2
        border = cv2.BORDER_REPLICATE if mode == "padedge" else cv2.BORDER_REFLECT_101
        out = cv2.copyMakeBorder(small, top, S - nh - top, left, S - nw - left, border)
        box = (top, left, nh, nw)
    x = (out.astype(np.float32) / 255.0 - mean) / std
    return x.transpose(2, 0, 1), box


@torch.no_grad()
def feats(samples):
    xs, boxes = zip(*(prep(read_image(s.path)) for s in samples), strict=True)
    x = torch.from_numpy(np.stack(xs))
    out = [teacher(x[i : i + 16]) for i in range(0, len(x), 16)]
    return [torch.cat([o[k] for o in out]) for k in range(3)], boxes


def back(amap, box):
    top, left, h, w = box
    return cv2.resize(amap[top : top + h, left : left + w], (S, S), interpolation=cv2.INTER_LINEAR)


sp = discover(data, 0.1, 0, need_test=True, max_images=200)
t0 = time.time()
tr, _ = feats(sp.train)
te, boxes = feats(sp.test)
masks = np.stack(
    [
        resize_mask(read_mask(s.mask, read_image(s.path).shape[:2]), (S, S)) if s.mask else np.zeros((S, S), bool)
        for s in sp.test
    ]
)
labels = np.array([s.label for s in sp.test])
size = (S, S)
g = DensityHead(spec.channels, size, 64).fit(tr)
gm = F.interpolate(head_map(g, te), size=size, mode="bilinear", align_corners=False)
bank = torch.cat(
    [
        pc_embed(tr[1][i : i + 16], tr[2][i : i + 16]).permute(0, 2, 3, 1).reshape(-1, tr[1].shape[1] + tr[2].shape[1])
        for i in range(0, len(tr[0]), 16)
    ]
)
bank = coreset(bank, max(1, int(0.01 * len(bank))))
km = F.interpolate(knn_map(bank, te), size=size, mode="bilinear", align_corners=False)


def z(m):
    q = torch.quantile(m.flatten()[::7], torch.tensor([0.5, 0.99]))
    return (m - q[0]) / (q[1] - q[0])


for head, m in (("gauss", gm), ("knn", km), ("blend", 0.5 * z(gm) + 0.5 * z(km))):
    amap = Blur(size, 4.0)(m)[:, 0].numpy()
    amap = np.stack([back(a, b) for a, b in zip(amap, boxes, strict=True)])
    row = dict(
        data=data.name,
        S=S,
        mode=mode,
        head=head,
        image_auroc=round(auroc(amap.reshape(len(amap), -1).max(1), labels), 4),
        pixel_auroc=round(auroc(amap, masks), 4),
        aupro=round(aupro(amap, masks), 4),
        s=round(time.time() - t0, 1),
    )
    print(json.dumps(row), flush=True)
    with (Path(__file__).resolve().parent / "results" / "letterbox.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
