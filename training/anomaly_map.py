"""Anomaly map and image score of the RD paper: the default of :mod:`training.scoring`, kept under its old name.

map = GaussianBlur_sigma4( sum_k upsample_bilinear( 1 - cos_channel(f_k, d_k) ) ), score = max(map).
The blur matches ``scipy.ndimage.gaussian_filter(sigma=4)`` (truncate 4 -> kernel 33, 'reflect' borders) as in the
official RD code. :mod:`training.scoring` generalises it (scale weights, standardisation, top-k score, density fusion).
"""

from __future__ import annotations

from torch import Tensor

from training.scoring import AnomalyScorer, gaussian_kernel1d, reflect_index

__all__ = ["AnomalyScorer", "anomaly_map", "gaussian_kernel1d", "reflect_index"]


def anomaly_map(
    teacher: list[Tensor], student: list[Tensor], image_size: tuple[int, int], sigma: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Functional form of the paper's :class:`AnomalyScorer` (builds the kernel each call)."""
    scorer = AnomalyScorer(image_size, sigma).to(teacher[0].device)
    return scorer(*teacher, *student)
