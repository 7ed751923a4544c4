"""Diagnosis (test figures, reported, never used in a run): the input's shape, for the training-free density head
alone on the frozen lite0 teacher.

kolektorsdd's parts are 512 x 203 pixels (height x width). The peers (``../shared/PEERS.md``) and rdedge until
2026-12-03 squashed them into a square, which halves their height at 256 px and quarters it at 128 px. This fits
the per-position Gaussian (``DensityHead``, 64 dims) on the same 180 training images at several ``(height, width)``
inputs and scores the test set, so the effect of the shape is seen apart from any training or selection.

    python benchmarks/aspect.py ../shared/datasets/kolektorsdd 128x128 192x96 256x256 416x160

Appends to ``benchmarks/results/aspect.jsonl`` and rewrites ``aspect.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fusion_diagnosis import feats_of
from head_diagnosis import head_map

from training.backbones import get_spec
from training.build import build_model
from training.config import load_train_config
from training.data import discover
from training.metrics import aupro, auroc
from training.scoring import Blur, DensityHead

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def run(data: Path, hw: tuple[int, int]) -> dict:
    cfg = load_train_config(None, {"data.image_size": 128, "model.projection": "identity"})
    teacher = build_model(cfg).eval().teacher
    spec = get_spec(cfg.model.backbone)
    t0 = time.time()
    sp = discover(data, 0.1, 0, need_test=True, max_images=200)
    train, _ = feats_of(teacher, sp.train, hw, spec, False)
    test, masks = feats_of(teacher, sp.test, hw, spec, True)
    labels = np.array([s.label for s in sp.test])
    head = DensityHead(spec.channels, hw, 64).fit(train)
    maps = F.interpolate(head_map(head, test), size=hw, mode="bilinear", align_corners=False)
    amap = Blur(hw, 4.0)(maps)[:, 0].numpy()
    return {
        "data": data.name,
        "hw": list(hw),
        "pixels": hw[0] * hw[1],
        "image_auroc": round(auroc(amap.reshape(len(amap), -1).max(1), labels), 4),
        "pixel_auroc": round(auroc(amap, masks), 4),
        "aupro": round(aupro(amap, masks), 4),
        "s": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_md(rows: list[dict]) -> None:
    lines = [
        "# The input's shape: the density head alone (test figures, a diagnosis)",
        "",
        "Per-position Gaussian (64 dims) on the frozen efficientnet_lite0 teacher, 180 training images (200 chosen "
        "evenly, seed-0 split), full test set; masks scored at the input size. Written by `benchmarks/aspect.py`.",
        "",
        "| data | input (height x width) | pixels | image AUROC | pixel AUROC | AUPRO | date |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['hw'][0]} x {r['hw'][1]} | {r['pixels']} | {r['image_auroc']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['date']} |"
        )
    (RESULTS / "aspect.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("shapes", nargs="+", help="HxW, e.g. 192x96")
    args = ap.parse_args()
    torch.set_num_threads(2)
    jsonl = RESULTS / "aspect.jsonl"
    for shape in args.shapes:
        h, w = (int(v) for v in shape.lower().split("x"))
        row = run(args.data, (h, w))
        print(json.dumps(row), flush=True)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
    write_md([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
