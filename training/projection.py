"""Trained projection stages between the teacher and the OCBE (``ReverseDistillation.projection``).

Both are plain ``nn.Module``s ``forward(f1, f2, f3) -> [p1, p2, p3]`` with the teacher's widths and strides, no
train/eval branches, and part of the inference model (the bundle's ``projection`` part). What trains them lives in
:mod:`training.objectives` and never enters the inference model.
"""

from __future__ import annotations

from torch import Tensor, nn

from training.backbones import BackboneSpec
from training.objective_config import ExtraConfig


class AuxHead(nn.Module):
    """One scale of the SimCLR-aligned projection: ``p = f + conv1x1(ReLU(BN(conv3x3(f))))``, ``(B, C, h, w)``.

    Residual, so at initialisation the OCBE sees (nearly) the teacher's features, as in plain RD; the alignment loss
    then pulls ``p`` toward the SimCLR auxiliary's features.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.conv2(self.relu(self.bn(self.conv1(f))))


class AuxProjection(nn.Module):
    """Three :class:`AuxHead` s, one per teacher scale (widths ``spec.channels``)."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.heads = nn.ModuleList([AuxHead(c1), AuxHead(c2), AuxHead(c3)])

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:
        return [self.heads[0](f1), self.heads[1](f2), self.heads[2](f3)]


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU()]


class RDPPLayer(nn.Module):
    """RD++ ``ProjLayer``: 4 x (3x3 conv, InstanceNorm, LeakyReLU), channels C -> C/2 -> C/4 -> C/2 -> C.

    As in the official code: convs with bias, InstanceNorm without affine parameters or running stats, LeakyReLU
    slope 0.01. Widths are floored at 1 (efficientnet_lite0's s4 map has 24 channels: 24 -> 12 -> 6 -> 12 -> 24).
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        h, q = max(1, c // 2), max(1, c // 4)
        self.proj = nn.Sequential(*_block(c, h), *_block(h, q), *_block(q, h), *_block(h, c))

    def forward(self, f: Tensor) -> Tensor:
        return self.proj(f)


class RDPPProjection(nn.Module):
    """RD++ ``MultiProjectionLayer``: one :class:`RDPPLayer` per teacher scale."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.proj_a, self.proj_b, self.proj_c = RDPPLayer(c1), RDPPLayer(c2), RDPPLayer(c3)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:
        return [self.proj_a(f1), self.proj_b(f2), self.proj_c(f3)]


def build(kind: str, spec: BackboneSpec, extra: ExtraConfig | None = None) -> nn.Module:
    """The projection for ``model.projection`` ``kind`` ("aux" or "rdpp"); the architecture depends on ``spec`` only."""
    del extra  # the architectures have no settings; the objectives' settings live in ``extra``
    if kind == "aux":
        return AuxProjection(spec)
    if kind == "rdpp":
        return RDPPProjection(spec)
    raise ValueError(f"unknown projection {kind!r}; expected 'aux' or 'rdpp'")
