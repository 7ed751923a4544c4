"""Reverse Distillation's knowledge-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def flattened_cosine_loss(teacher: list[Tensor], student: list[Tensor]) -> Tensor:
    """RD loss: per scale, ``mean_b(1 - cos(flatten(t_b), flatten(s_b)))`` over the C*H*W vector, summed over scales.

    Args:
        teacher: per-scale teacher maps ``(B, C_k, H_k, W_k)``.
        student: decoder maps of the same shapes.

    Returns:
        Scalar loss (0 when every student map is a positive multiple of its teacher map).
    """
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher scales vs {len(student)} student scales")
    loss = torch.zeros((), device=teacher[0].device)
    for t, s in zip(teacher, student, strict=True):
        loss = loss + (1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
    return loss
