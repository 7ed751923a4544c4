"""Vectorised 3-D simplex noise (Gustavson's formulation) and RD++'s simplex-noise pseudo-anomalies.

RD++ adds a patch of octave simplex noise (6 octaves, persistence 0.6, scaled by 0.2, 10-32 px sides) to the [0, 1]
training image. The official code draws each patch per image in the data loader with a Python/numba simplex
implementation; here noise is evaluated for a whole grid at once in torch, and by default a seeded bank of tiles is
computed once so a training step only crops, places and adds patches (see :class:`PseudoAnomaly`).

Deviation (documented): the coarsest octave has a period of ``base_period`` pixels (32, the largest patch side) and
each further octave doubles the frequency; the three colour channels are three neighbouring slices (z = 0, 1, 2) of
the 3-D noise, as in ``rand_3d_octaves((3, h, w), ...)``. The octave sum is divided by the sum of amplitudes, so
the noise lies in about [-1, 1] before scaling.
"""

from __future__ import annotations

import torch
from torch import Tensor

_F3, _G3 = 1.0 / 3.0, 1.0 / 6.0
_GRAD3 = torch.tensor(
    [
        [1, 1, 0],
        [-1, 1, 0],
        [1, -1, 0],
        [-1, -1, 0],
        [1, 0, 1],
        [-1, 0, 1],
        [1, 0, -1],
        [-1, 0, -1],
        [0, 1, 1],
        [0, -1, 1],
        [0, 1, -1],
        [0, -1, -1],
    ],
    dtype=torch.float32,
)


def simplex3(x: Tensor, y: Tensor, z: Tensor, perm: Tensor) -> Tensor:
    """3-D simplex noise at points ``(x, y, z)`` (any equal shapes), values in about [-1, 1].

    Args:
        x, y, z: float coordinates.
        perm: int64 ``(512,)`` permutation table (a permutation of 0..255, repeated twice).
    """
    s = (x + y + z) * _F3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * _G3
    p0 = torch.stack([x - (i - t), y - (j - t), z - (k - t)], dim=-1)  # (..., 3) offset from the first corner
    # Which of the six tetrahedra: the GLSL form g = step(x0.yzx, x0.xyz), i1 = min(g, l.zxy), i2 = max(g, l.zxy).
    g = (p0 >= p0[..., [1, 2, 0]]).to(p0.dtype)
    lo = 1.0 - g
    i1 = torch.minimum(g, lo[..., [2, 0, 1]])
    i2 = torch.maximum(g, lo[..., [2, 0, 1]])
    offsets = [torch.zeros_like(i1), i1, i2, torch.ones_like(i1)]
    ii, jj, kk = (i.long() & 255), (j.long() & 255), (k.long() & 255)
    out = torch.zeros_like(x)
    grad3 = _GRAD3.to(x.device, x.dtype)
    for n, off in enumerate(offsets):
        pn = p0 - off + n * _G3
        o = off.long()
        h = perm[ii + o[..., 0] + perm[jj + o[..., 1] + perm[kk + o[..., 2]]]] % 12
        tn = (0.6 - (pn * pn).sum(-1)).clamp(min=0.0)
        out = out + tn**4 * (grad3[h] * pn).sum(-1)
    return 32.0 * out


def permutation(generator: torch.Generator) -> Tensor:
    """A seeded simplex permutation table ``(512,)`` int64."""
    p = torch.randperm(256, generator=generator)
    return torch.cat([p, p])


def octave_noise(
    n: int,
    height: int,
    width: int,
    octaves: int = 6,
    persistence: float = 0.6,
    base_period: float = 32.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` tiles of 3-channel octave simplex noise ``(n, 3, height, width)``, about [-1, 1], deterministic by seed.

    Each tile is a different random translation of one seeded noise field.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    perm = permutation(g)
    shift = torch.rand(n, 3, generator=g) * 256.0  # per tile translation in noise space
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    cc = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1)
    total = torch.zeros(n, 3, height, width)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        f = (2.0**o) / base_period
        x = (xx.view(1, 1, height, width) * f + shift[:, 0].view(n, 1, 1, 1)).expand(n, 3, height, width)
        y = (yy.view(1, 1, height, width) * f + shift[:, 1].view(n, 1, 1, 1)).expand(n, 3, height, width)
        z = (cc + shift[:, 2].view(n, 1, 1, 1)).expand(n, 3, height, width)
        total += amp * simplex3(x, y, z, perm)
        norm += amp
        amp *= persistence
    return total / norm


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of an image side or pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PseudoAnomaly:
    """RD++ simplex-noise pseudo-anomalies for a batch: one random noise patch per image, in [0, 1] image units.

    Args:
        size: image side in pixels, or ``(height, width)``.
        patch: (min, max) patch side in pixels (RD++: 10 to 32; the maximum is capped at the shorter side - 2).
        scale: noise amplitude (RD++: 0.2).
        octaves, persistence: octave noise (RD++: 6, 0.6).
        bank: number of tiles computed once at construction (0: fresh noise every call).
        seed: seeds the bank and the placement.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        patch: tuple[int, int] = (10, 32),
        scale: float = 0.2,
        octaves: int = 6,
        persistence: float = 0.6,
        bank: int = 64,
        seed: int = 0,
    ) -> None:
        self.hw = as_hw(size)
        hi = min(patch[1], min(self.hw) - 2)
        self.patch = (min(patch[0], hi), hi)
        self.scale, self.octaves, self.persistence = scale, octaves, persistence
        self.g = torch.Generator().manual_seed(seed)
        self.bank = self._tiles(bank) if bank > 0 else None

    def _tiles(self, n: int) -> Tensor:
        side = self.patch[1]
        return octave_noise(n, side, side, self.octaves, self.persistence, generator=self.g)

    def __call__(self, batch: int) -> Tensor:
        """Noise to add to a batch of ``[0, 1]`` images: ``(batch, 3, H, W)``, zero outside each patch."""
        tiles = self.bank if self.bank is not None else self._tiles(batch)
        pick = torch.randint(0, tiles.shape[0], (batch,), generator=self.g)
        hw = torch.randint(self.patch[0], self.patch[1] + 1, (batch, 2), generator=self.g)
        canvas = torch.zeros(batch, 3, *self.hw)
        for b in range(batch):  # B slice copies: microseconds, no noise is computed here
            h, w = int(hw[b, 0]), int(hw[b, 1])
            top = int(torch.randint(1, self.hw[0] - h, (1,), generator=self.g))  # official: randint(1, size - h)
            left = int(torch.randint(1, self.hw[1] - w, (1,), generator=self.g))
            oy = int(torch.randint(0, tiles.shape[2] - h + 1, (1,), generator=self.g))  # where in the tile
            ox = int(torch.randint(0, tiles.shape[3] - w + 1, (1,), generator=self.g))
            canvas[b, :, top : top + h, left : left + w] = tiles[int(pick[b]), :, oy : oy + h, ox : ox + w]
        return self.scale * canvas
