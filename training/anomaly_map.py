"""Anomaly map and image score: the one implementation used by evaluation and exported as the bundle's ``score`` part.

map = GaussianBlur_sigma4( sum_k upsample_bilinear( 1 - cos_channel(f_k, d_k) ) ), score = max(map).
The blur matches ``scipy.ndimage.gaussian_filter(sigma=4)`` (truncate 4 -> kernel 33, 'reflect' borders) as in the
official RD code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian, length ``2 * int(truncate * sigma + 0.5) + 1`` (33 for sigma 4), float32."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


def _reflect_index(n: int, radius: int) -> Tensor:
    """Indices that pad a length-``n`` axis by ``radius`` on both sides the way scipy's ``mode='reflect'`` does."""
    idx = torch.arange(-radius, n + radius)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


class AnomalyScorer(nn.Module):
    """``(f1, f2, f3, d1, d2, d3)`` -> ``(anomaly_map (B, 1, H, W), score (B,))``, all FP32.

    Args:
        image_size: ``(H, W)`` of the model input; maps are upsampled to it.
        sigma: Gaussian blur sigma in pixels (RD: 4). ``0`` disables the blur.
    """

    def __init__(self, image_size: tuple[int, int], sigma: float = 4.0) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.sigma = float(sigma)
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.radius = (k.numel() - 1) // 2
        # Separable blur as two depthwise convs; kept as buffers so ONNX export bakes them in.
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("pad_h", _reflect_index(self.image_size[0], self.radius), persistent=False)
        self.register_buffer("pad_w", _reflect_index(self.image_size[1], self.radius), persistent=False)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor, d1: Tensor, d2: Tensor, d3: Tensor) -> tuple[Tensor, Tensor]:
        amap = torch.zeros(f1.shape[0], 1, *self.image_size, device=f1.device, dtype=torch.float32)
        for f, d in ((f1, d1), (f2, d2), (f3, d3)):
            m = 1.0 - F.cosine_similarity(f.float(), d.float(), dim=1).unsqueeze(1)  # (B, 1, h, w)
            amap = amap + F.interpolate(m, size=self.image_size, mode="bilinear", align_corners=True)
        if self.radius > 0:
            # scipy's 'reflect' border (d c b a | a b c d | d c b a) as a constant gather, then the separable blur.
            amap = amap.index_select(2, self.pad_h).index_select(3, self.pad_w)
            amap = F.conv2d(F.conv2d(amap, self.kx), self.ky)
        score = amap.flatten(1).amax(dim=1)
        return amap, score


def anomaly_map(
    teacher: list[Tensor], student: list[Tensor], image_size: tuple[int, int], sigma: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Functional form of :class:`AnomalyScorer` (builds the kernel each call)."""
    scorer = AnomalyScorer(image_size, sigma).to(teacher[0].device)
    return scorer(*teacher, *student)
