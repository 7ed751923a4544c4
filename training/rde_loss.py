"""RD-E's losses (all weights 1, each summed over the three scales).

``d`` is RD's flattened ``1 - cos`` (:func:`training.loss.flattened_cosine_loss`), ``d_p`` the per-pixel ``1 - cos``
over channels. ``E`` expert, ``T`` teacher, ``S`` student, ``x~`` the synthetic anomaly of ``x`` with mask ``M``:

- teacher: ``mean d_p(T(x), E(x)) + L1(d_p(T(x~), E(x)), M) + d(T(x~), E(x~))``: stay the expert on normal
  regions, move away from it exactly where the anomaly is, and keep its overall view of the anomalous image.
- student: ``d(S(x), T(x)) + d(S(x~), T(x)) + d(S(x), E(x)) + d(S(x~), E(x))``: reconstruct the *normal*
  features of both teacher and expert, from the normal and the anomalous image alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.loss import flattened_cosine_loss


def pixel_cos_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos`` over channels: ``(B, C, h, w)`` x2 -> ``(B, h, w)``, in [0, 2]."""
    return 1.0 - F.cosine_similarity(a, b, dim=1)


def mask_at(mask: Tensor, like: Tensor) -> Tensor:
    """``M (B, 1, H, W)`` -> ``(B, h, w)`` at ``like``'s resolution: the anomalous share of each cell."""
    return F.interpolate(mask, size=like.shape[-2:], mode="area")[:, 0]


def teacher_loss(
    t_x: list[Tensor], t_xt: list[Tensor], e_x: list[Tensor], e_xt: list[Tensor], mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """The teacher's loss; each list holds the per-scale ``(B, C_k, h_k, w_k)`` maps.

    Returns:
        ``(scalar loss, {"t_normal", "t_mask", "t_global"})`` (the three terms, summed over scales).
    """
    normal = torch.zeros((), device=mask.device)
    masked = torch.zeros((), device=mask.device)
    for tx, txt, ex in zip(t_x, t_xt, e_x, strict=True):
        normal = normal + pixel_cos_distance(tx, ex).mean()
        masked = masked + F.l1_loss(pixel_cos_distance(txt, ex), mask_at(mask, txt))
    glob = flattened_cosine_loss(e_xt, t_xt)
    loss = normal + masked + glob
    return loss, {
        "t_normal": float(normal.detach()),
        "t_mask": float(masked.detach()),
        "t_global": float(glob.detach()),
    }


def student_loss(
    s_x: list[Tensor], s_xt: list[Tensor], t_x: list[Tensor], e_x: list[Tensor]
) -> tuple[Tensor, dict[str, float]]:
    """The student's loss (teacher and expert maps are targets: no gradient reaches them).

    Returns:
        ``(scalar loss, {"s_teacher", "s_expert"})``: the two ``d(S, T(x))`` and the two ``d(S, E(x))`` terms.
    """
    to_t = flattened_cosine_loss(t_x, s_x) + flattened_cosine_loss(t_x, s_xt)
    to_e = flattened_cosine_loss(e_x, s_x) + flattened_cosine_loss(e_x, s_xt)
    return to_t + to_e, {"s_teacher": float(to_t.detach()), "s_expert": float(to_e.detach())}
