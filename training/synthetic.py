"""Synthetic defects on held-out good images: the validation signal that sees defects without using any.

Four kinds, cycled so every kind is equally represented, each with its exact mask, all in ``[0, 1]`` RGB image space
at the model resolution (made from the already preprocessed validation tensors, so nothing is decoded again):

- ``texture``: a Perlin-like mask (thresholded octave simplex noise, as DRAEM / RD-E make them) filled with a
  *foreign* texture, blended with opacity in [0.3, 0.9). DRAEM and RD-E fill it from DTD, which a line box cannot
  download; here the texture is a fresh octave-simplex field (random period and contrast, grey on grey parts). The
  first version filled it from another good image of the same part: on a random surface (kolektorsdd) that is a
  patch of normal surface, which no candidate told from good (image AUROC 0.48-0.52), so it only added noise.
- ``cutpaste``: a rectangle cut from another good image at another place, pasted (CutPaste, Li et al. 2021).
- ``scratch``: a thin random polyline 1-3 px wide, darker or brighter by 0.12-0.45.
- ``spot``: a filled ellipse whose intensity is shifted by 0.1-0.4 (blowholes, stains).

Sizes follow real defects of the shared sets: 3-15% of the image side (for a non-square input, of the side of the
square of the same area). Deterministic by seed: the same set every evaluation, so checkpoints are compared on the
same images.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from training.simplex import octave_noise

KINDS = ("texture", "cutpaste", "scratch", "spot")


def _side(hw: tuple[int, int]) -> int:
    """The side of the square of the image's area: what defect sizes are a share of."""
    return int(round(float(np.sqrt(hw[0] * hw[1]))))


def _perlin_mask(rng: np.random.Generator, hw: tuple[int, int], g: torch.Generator) -> np.ndarray:
    """A blob-like binary mask from thresholded octave noise, confined to a random box of 8-30% of the side."""
    size = _side(hw)
    period = float(2 ** rng.integers(2, 5))  # 4..16 px features
    noise = octave_noise(1, *hw, octaves=3, persistence=0.5, base_period=period, generator=g)[0, 0].numpy()
    mask = noise > 0.25
    side = min(int(rng.integers(max(4, size * 8 // 100), max(6, size * 30 // 100))), min(hw) - 1)
    y, x = (int(v) for v in rng.integers(0, np.array([hw[0] - side, hw[1] - side])))
    box = np.zeros_like(mask)
    box[y : y + side, x : x + side] = True
    mask &= box
    if mask.sum() < 4:  # noise too low there: fall back to an ellipse in the box
        mask = _ellipse(rng, hw, side // 2, side // 3, (y + side // 2, x + side // 2))
    return mask


def _ellipse(rng: np.random.Generator, hw: tuple[int, int], a: int, b: int, center: tuple[int, int]) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    cv2.ellipse(m, (center[1], center[0]), (max(a, 1), max(b, 1)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return m.astype(bool)


def _foreign_texture(rng: np.random.Generator, hw: tuple[int, int], g: torch.Generator, grey: bool) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1]: octave simplex noise, period 2-16 px, contrast 0.3-1, mean 0.2-0.8."""
    period = float(2 ** rng.integers(1, 5))
    noise = octave_noise(1, *hw, octaves=4, persistence=0.6, base_period=period, generator=g)[0].numpy()
    noise = noise.transpose(1, 2, 0)  # (H, W, 3), about [-1, 1]
    if grey:
        noise = np.repeat(noise[..., :1], 3, axis=2)
    tex = float(rng.uniform(0.2, 0.8)) + 0.5 * float(rng.uniform(0.3, 1.0)) * noise
    return np.clip(tex, 0.0, 1.0).astype(np.float32)


def make_defect(
    image: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator, g: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect.

    Args:
        image: ``(H, W, 3)`` float32 in [0, 1].
        other: another good image of the same shape (the cut-paste source).
        kind: one of :data:`KINDS`.
        rng, g: seeded generators.

    Returns:
        ``(defective image (H, W, 3) float32 in [0, 1], mask (H, W) bool)``.
    """
    hw = (int(image.shape[0]), int(image.shape[1]))
    size = _side(hw)
    out = image.copy()
    if kind == "texture":
        mask = _perlin_mask(rng, hw, g)
        tex = _foreign_texture(rng, hw, g, grey=bool(np.ptp(image, axis=2).max() < 1e-6))
        beta = float(rng.uniform(0.3, 0.9))
        m = mask[..., None]
        out = np.where(m, (1 - beta) * image + beta * tex, image)
    elif kind == "cutpaste":
        h = min(int(rng.integers(max(3, size * 5 // 100), max(5, size * 15 // 100))), min(hw) - 1)
        w = min(int(rng.integers(max(3, size * 5 // 100), max(5, size * 25 // 100))), min(hw) - 1)
        room = np.array([hw[0] - max(h, w), hw[1] - max(h, w)])
        sy, sx = (int(v) for v in rng.integers(0, room))
        dy, dx = (int(v) for v in rng.integers(0, room))
        patch = other[sy : sy + h, sx : sx + w]
        if rng.random() < 0.5:
            patch = patch[::-1]
        out[dy : dy + h, dx : dx + w] = patch
        mask = np.zeros(hw, bool)
        mask[dy : dy + h, dx : dx + w] = True
    elif kind == "scratch":
        m = np.zeros(hw, np.uint8)
        n = int(rng.integers(2, 5))
        length = rng.uniform(0.08, 0.3) * size
        xy = np.array([hw[1], hw[0]], np.float64)  # cv2 points are (x, y)
        p = rng.uniform(0.15 * xy, 0.85 * xy)
        angle = rng.uniform(0, 2 * np.pi)
        pts = [p.copy()]
        for _ in range(n):
            angle += rng.normal(0, 0.4)
            p = np.clip(p + length / n * np.array([np.cos(angle), np.sin(angle)]), 0, xy - 1)
            pts.append(p.copy())
        cv2.polylines(m, [np.round(np.array(pts)).astype(np.int32)], False, 1, int(rng.integers(1, 4)))
        mask = m.astype(bool)
        delta = float(rng.uniform(0.12, 0.45)) * (1 if rng.random() < 0.5 else -1)
        out = np.where(mask[..., None], image + delta, image)
    elif kind == "spot":
        a = int(rng.integers(max(2, size * 2 // 100), max(3, size * 8 // 100)))
        b = max(1, int(a * rng.uniform(0.5, 1.0)))
        c = (int(rng.integers(a, hw[0] - a)), int(rng.integers(a, hw[1] - a)))
        mask = _ellipse(rng, hw, a, b, c)
        delta = float(rng.uniform(0.1, 0.4)) * (1 if rng.random() < 0.5 else -1)
        out = np.where(mask[..., None], image + delta, image)
    else:
        raise ValueError(f"unknown synthetic defect kind {kind!r}; choose one of {KINDS}")
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    # Only pixels that actually changed are defect pixels (a scratch over a same-coloured area is no defect).
    changed = np.abs(out - image).max(axis=2) > 0.02
    return out, mask & changed


def synthesize(images: np.ndarray, per_image: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Synthetic defects on good images.

    Args:
        images: ``(N, H, W, 3)`` float32 in [0, 1] (N >= 1; with N == 1 the image is its own texture source).
        per_image: defects made from each image.
        seed: makes the set deterministic.

    Returns:
        ``(defective (N*per_image, H, W, 3), masks (N*per_image, H, W) bool, kinds)``; defects whose mask came out
        empty are retried with another kind.
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    outs, masks, kinds = [], [], []
    j = 0
    for i in range(n):
        for _ in range(per_image):
            for attempt in range(len(KINDS)):
                kind = KINDS[(j + attempt) % len(KINDS)]
                other = images[(i + 1 + int(rng.integers(0, max(n - 1, 1)))) % n]
                img, mask = make_defect(images[i], other, kind, rng, g)
                if mask.sum() >= 4:
                    break
            j += 1
            outs.append(img)
            masks.append(mask)
            kinds.append(kind)
    return np.stack(outs), np.stack(masks), kinds
