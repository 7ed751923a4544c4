"""Deterministic synthetic MVTec-layout category: textured parts with scratches, spots, cracks and missing chunks.

The embedded default for the demo and the tests (no real data is committed). Every image is a function of
(seed, index), and every mask is exact: the defect is drawn into a mask first and the image is changed only where
the mask is set.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("scratch", "spot", "crack", "missing")


def _part(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free part: brushed-metal texture on a disc with a bore, slight pose and lighting changes. BGR."""
    noise = rng.normal(0, 1, (size // 4, size // 4)).astype(np.float32)
    tex = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    streak = cv2.blur(rng.normal(0, 1, (size, size)).astype(np.float32), (1, 15))  # brushing direction
    base = 130 + 12 * tex + 20 * streak + rng.uniform(-8, 8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    r = np.hypot(xx - cx, yy - cy)
    img = np.where(r < size * 0.44, base, 40 + 4 * tex)  # part on a dark background
    img = np.where(r < size * 0.12, 25.0, img)  # bore
    img += 15 * (xx - cx) / size  # lighting gradient
    grey = np.clip(img, 0, 255).astype(np.uint8)
    bgr = cv2.merge([grey, (grey * 0.97).astype(np.uint8), (grey * 0.92).astype(np.uint8)])
    return bgr


def _on_part(rng: np.random.Generator, size: int) -> tuple[int, int]:
    while True:
        x, y = rng.integers(int(size * 0.2), int(size * 0.8), 2)
        if np.hypot(x - size / 2, y - size / 2) > size * 0.2:
            return int(x), int(y)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    x, y = _on_part(rng, size)
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.2, 0.35) * size
        dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
        cv2.line(mask, (int(x - dx), int(y - dy)), (int(x + dx), int(y + dy)), 255, max(1, size // 64))
        value = 235
    elif kind == "spot":
        hi = max(size // 14, 4)
        cv2.ellipse(
            mask,
            (x, y),
            (int(rng.integers(2, hi)), int(rng.integers(2, hi))),
            float(rng.uniform(0, 180)),
            0,
            360,
            255,
            -1,
        )
        value = 60
    elif kind == "crack":
        pts = [(x, y)]
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(8):
            ang += rng.uniform(-0.8, 0.8)
            step = size / 30
            pts.append((int(pts[-1][0] + np.cos(ang) * step), int(pts[-1][1] + np.sin(ang) * step)))
        cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, max(1, size // 80))
        value = 15
    elif kind == "missing":
        lo, hi = max(size // 10, 2), max(size // 6, 3)
        w, h = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        cv2.rectangle(mask, (x - w // 2, y - h // 2), (x + w // 2, y + h // 2), 255, -1)
        value = 40
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    out = img.copy()
    sel = mask > 0
    out[sel] = np.clip(value + rng.normal(0, 6, (int(sel.sum()), 3)), 0, 255).astype(np.uint8)
    return out, mask


def make_demo_data(
    out_dir: str | Path,
    category: str = "synthetic",
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_defect: int = 6,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/category`` in MVTec layout and return the category path.

    Args:
        out_dir: parent folder (created).
        category: category folder name.
        n_train: defect-free training images.
        n_test_good: defect-free test images.
        n_test_defect: test images per defect type (scratch, spot, crack, missing).
        size: square image side in pixels.
        seed: everything is a function of it.
    """
    root = Path(out_dir) / category
    rng = np.random.default_rng(seed)
    for sub in ["train/good", "test/good", *(f"test/{d}" for d in DEFECTS), *(f"ground_truth/{d}" for d in DEFECTS)]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), _part(rng, size))
    for i in range(n_test_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), _part(rng, size))
    for d in DEFECTS:
        for i in range(n_test_defect):
            img, mask = _defect(rng, _part(rng, size), d)
            cv2.imwrite(str(root / "test" / d / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / d / f"{i:03d}_mask.png"), mask)
    return root
