"""RD-E's synthetic anomalies ``(x, x~, M)``, made for every training sample of every step (DRAEM's recipe).

Mask: 2-D Perlin noise with a random grid of ``2**a x 2**b`` cells, ``a, b`` drawn from
``[perlin_min, perlin_max]`` (paper: 2^0..2^5), thresholded at ``threshold`` (paper: 0.5). Fill: a texture blended as
``x~ = x * (1 - M) + M * (beta * x + (1 - beta) * texture)``, ``beta`` uniform in ``[0, beta_max)`` (paper: 0.8).

Textures (deviation: the paper uses DTD, which cannot be downloaded on a line box):

- ``images``: another training image of the same batch, shifted by a random offset (wrapped) and flipped at random;
- ``simplex``: a tile of a seeded bank of colour octave simplex noise (:func:`training.simplex.octave_noise`),
  mapped to [0, 1] RGB;
- ``mixed`` (default): one or the other with probability 1/2 per sample.

Everything happens on the already normalised ``(B, 3, H, W)`` tensors: normalisation is affine per channel, so a
convex blend of normalised images is the normalised blend of the [0, 1] images. No foreground restriction (the
paper limits object categories to the foreground; the shared sets here are surfaces).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from training.objective_config import RDEConfig
from training.simplex import as_hw, octave_noise


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_2d(height: int, width: int, res: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Gradient (Perlin) noise ``(height, width)``, about [-1, 1], on a grid of ``res = (rows, cols)`` cells.

    Points are sampled on a grid of ``ceil(size / res)`` per cell and cropped, so any size works.
    """
    ry, rx = res
    dy, dx = math.ceil(height / ry), math.ceil(width / rx)
    angles = 2.0 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1, rx+1, 2)
    ty = (torch.arange(ry * dy, dtype=torch.float32) / dy) % 1.0
    tx = (torch.arange(rx * dx, dtype=torch.float32) / dx) % 1.0
    gy, gx = torch.meshgrid(ty, tx, indexing="ij")  # position inside its cell, (ry*dy, rx*dx)

    def corner(oy: int, ox: int) -> Tensor:
        g = grads[oy : oy + ry, ox : ox + rx].repeat_interleave(dy, 0).repeat_interleave(dx, 1)
        return (gy - oy) * g[..., 0] + (gx - ox) * g[..., 1]

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    uy, ux = _fade(gy), _fade(gx)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    return (math.sqrt(2.0) * (top + uy * (bottom - top)))[:height, :width]


class PerlinAnomaly:
    """Makes ``(x~, M)`` for a batch of normalised images.

    Args:
        size: image side in pixels, or ``(height, width)``.
        mean, std: the teacher's normalisation (to map simplex textures from [0, 1]).
        cfg: RD-E settings (scales, threshold, beta, texture source).
        seed: seeds the masks, blends and the simplex bank.
        bank: simplex texture tiles computed once (when the texture source uses them).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        cfg: RDEConfig,
        seed: int = 0,
        bank: int = 8,
    ) -> None:
        self.hw = as_hw(size)
        self.cfg = cfg
        self.g = torch.Generator().manual_seed(seed * 7919 + 11)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.bank: Tensor | None = None
        if cfg.texture != "images":
            period = math.sqrt(self.hw[0] * self.hw[1]) / 2
            unit = 0.5 + 0.5 * octave_noise(bank, *self.hw, octaves=4, persistence=0.5, base_period=period,
                                            generator=self.g)  # fmt: skip
            self.bank = (unit.clamp(0.0, 1.0) - self.mean) / self.std

    def mask(self) -> Tensor:
        """One ``(H, W)`` {0, 1} float mask (redrawn up to 4 times when the noise stays under the threshold)."""
        lo, hi = self.cfg.perlin_min, self.cfg.perlin_max
        m = torch.zeros(*self.hw)
        for _ in range(4):
            a, b = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=self.g))
            noise = perlin_2d(*self.hw, (2**a, 2**b), self.g)
            m = (noise > self.cfg.threshold).float()
            if m.sum() > 0:
                break
        return m

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, 3, H, W)`` normalised -> ``(x~ (B, 3, H, W), M (B, 1, H, W) in {0, 1})`` on ``x``'s device."""
        b = x.shape[0]
        masks = torch.stack([self.mask() for _ in range(b)]).unsqueeze(1).to(x.device)
        beta = (torch.rand(b, 1, 1, 1, generator=self.g) * self.cfg.beta_max).to(x.device)
        tex = self._textures(x)
        x_t = x * (1.0 - masks) + masks * (beta * x + (1.0 - beta) * tex)
        return x_t, masks

    def _textures(self, x: Tensor) -> Tensor:
        b, (h, w) = x.shape[0], self.hw
        out = torch.empty_like(x)
        use_simplex = {"simplex": torch.ones(b), "images": torch.zeros(b)}.get(
            self.cfg.texture, (torch.rand(b, generator=self.g) < 0.5).float()
        )
        for i in range(b):  # B small tensor copies
            if use_simplex[i] > 0 and self.bank is not None:
                out[i] = self.bank[int(torch.randint(0, self.bank.shape[0], (1,), generator=self.g))].to(x.device)
                continue
            j = (i + 1 + int(torch.randint(0, max(b - 1, 1), (1,), generator=self.g))) % b if b > 1 else i
            dy = int(torch.randint(h // 4, 3 * h // 4 + 1, (1,), generator=self.g))
            dx = int(torch.randint(w // 4, 3 * w // 4 + 1, (1,), generator=self.g))
            tex = torch.roll(x[j], (dy, dx), dims=(1, 2))
            if torch.rand(1, generator=self.g) < 0.5:
                tex = tex.flip(1, 2)
            out[i] = tex
        return out
