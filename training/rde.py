"""RD-E (Liu et al., "Unlocking the Potential of Reverse Distillation for Anomaly Detection", AAAI 2025): the model.

Three networks: a frozen ImageNet **expert** (training only, never in a checkpoint's ``model`` nor in a bundle), a
trainable **teacher** (a copy of the expert, fine-tuned on synthetic anomalies) and the **student** (OCBE + decoder
+ guided information injection). At inference the fine-tuned teacher and the student form the usual RD chain, with
one change to the part contract: the decoder also reads the teacher's features (``z, f1, f2, f3 -> d1, d2, d3``).

Guided information injection (GII) at the two decoder junctions (after the stride-16 and the stride-8 stage), with
``D_k`` the decoder stage output and ``T_k`` the teacher feature of the same scale:

    F_T = CBR3(T_k + conv1x1(avgpool2(T_{k-1})))            T_{k-1}: the next finer teacher map, pooled to T_k's size
    s   = cos(D_k, T_k) per pixel, no gradient               (B, 1, h, w)
    inj = CBR3(F_T * s + D_k * (1 - s))   gated
    inj = CBR3(F_T + D_k)                 ungated (our reading of the variant without the similarity gate)
    next stage input = CBR3(concat[D_k, inj])                CBR3 = conv3x3 -> BatchNorm -> ReLU

``gii: off`` keeps the plain RD decoder (the bundle then has the unchanged RD contract).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.backbones import BackboneSpec
from training.model import Decoder, ReverseDistillation

Gii = Literal["gated", "ungated", "off"]


def _cbr(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU, size-preserving."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GuidedInjection(nn.Module):
    """One GII block: ``d (B,c,h,w), t (B,c,h,w), t_prev (B,c_prev,2h,2w)`` -> next decoder input ``(B,c,h,w)``.

    Args:
        channels: ``c``, the width of ``d`` and ``t``.
        prev_channels: ``c_prev``, the width of the finer teacher map ``t_prev``.
        gated: weight teacher and decoder information by their per-pixel cosine similarity.
    """

    def __init__(self, channels: int, prev_channels: int, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.lateral = nn.Conv2d(prev_channels, channels, 1, bias=False)
        self.teacher_fuse = _cbr(channels, channels)
        self.inject = _cbr(channels, channels)
        self.merge = _cbr(2 * channels, channels)

    def forward(self, d: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        f_t = self.teacher_fuse(t + self.lateral(F.avg_pool2d(t_prev, 2)))
        if self.gated:  # a fixed attribute, not a mode: the exported graph is one straight line either way
            # detached: the gate steers the mix, it is not trained through (the paper computes it without grad)
            s = F.cosine_similarity(d.detach(), t.detach(), dim=1).unsqueeze(1)
            mixed = f_t * s + d * (1.0 - s)
        else:
            mixed = f_t + d
        return self.merge(torch.cat([d, self.inject(mixed)], dim=1))


class InjectionDecoder(Decoder):
    """The RD decoder with GII after its first two stages.

    ``forward(z (B,2*c3,H/32,W/32), f1 (B,c1,H/4,W/4), f2 (B,c2,H/8,W/8), f3 (B,c3,H/16,W/16))`` ->
    ``[d1, d2, d3]`` shaped like ``[f1, f2, f3]``. Stage outputs are what the losses and the anomaly map compare;
    the injected maps only feed the next stage.
    """

    #: The decoder part reads the teacher features too (export and runtime read this to wire the part).
    takes_teacher = True

    def __init__(self, spec: BackboneSpec, gated: bool) -> None:
        super().__init__(spec)
        c1, c2, c3 = spec.channels
        self.gii3 = GuidedInjection(c3, c2, gated)
        self.gii2 = GuidedInjection(c2, c1, gated)

    def forward(self, z: Tensor, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:  # type: ignore[override]
        d3 = self.layer1(z)
        d2 = self.layer2(self.gii3(d3, f3, f2))
        d1 = self.layer3(self.gii2(d2, f2, f1))
        return [d1, d2, d3]


def takes_teacher(decoder: nn.Module) -> bool:
    """True when ``decoder.forward`` is ``(z, f1, f2, f3)`` (RD-E with injection) rather than ``(z,)``."""
    return bool(getattr(decoder, "takes_teacher", False))


class RDEStudent(nn.Module):
    """``[f1, f2, f3]`` (the tuned teacher's features) -> OCBE -> decoder (with GII) -> ``[d1, d2, d3]``.

    Same call as :class:`training.model.Student`, so the selection scores it unchanged.
    """

    def __init__(self, ocbe: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.ocbe, self.decoder = ocbe, decoder
        self._with_teacher = takes_teacher(decoder)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:
        z = self.ocbe(f1, f2, f3)
        return self.decoder(z, f1, f2, f3) if self._with_teacher else self.decoder(z)


class RDEModel(ReverseDistillation):
    """The RD-E inference model: tuned teacher -> identity projection -> OCBE -> decoder (GII reads the teacher).

    ``forward(image)`` returns ``(teacher_feats, student_feats)`` like :class:`ReverseDistillation`; its state_dict
    has the same keys plus ``decoder.gii*`` (with injection). The expert is not part of it.

    Args:
        teacher: the trainable teacher (its parameters are left trainable; :func:`make_expert` freezes a copy).
        spec: teacher spec (channel widths, decoder sizing).
        gii: ``gated`` | ``ungated`` | ``off``.
    """

    def __init__(self, teacher: nn.Module, spec: BackboneSpec, gii: Gii = "gated") -> None:
        super().__init__(teacher, spec)
        if gii != "off":
            self.decoder = InjectionDecoder(spec, gated=gii == "gated")
        self.gii = gii

    def train(self, mode: bool = True) -> RDEModel:
        nn.Module.train(self, mode)  # the teacher trains too (RD's override keeps it in eval)
        return self

    def forward(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.teacher(image)
        return feats, self.student()(*feats)

    def student(self) -> RDEStudent:
        """The student path as its own module (same parameters)."""
        return RDEStudent(self.ocbe, self.decoder)

    def student_parameters(self) -> list[nn.Parameter]:
        """OCBE + decoder (+ GII) parameters: the student optimiser's."""
        return [*self.ocbe.parameters(), *self.decoder.parameters()]


def make_expert(teacher: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of the (not yet tuned) teacher: the expert, used only by the training losses."""
    expert = copy.deepcopy(teacher).eval()
    for p in expert.parameters():
        p.requires_grad_(False)
    return expert
