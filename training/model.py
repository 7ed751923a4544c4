"""Reverse Distillation (Deng & Li, CVPR 2022): teacher -> projection -> OCBE -> student decoder.

Plain ``nn.Module``s whose ``forward`` is a straight line (no train/eval branches) so each part exports to ONNX
cleanly. The OCBE and decoder are built from the teacher's channel widths ``(c1, c2, c3)``; for
``wide_resnet50_2`` (256, 512, 1024) with width_per_group 128 they match the official code exactly:
fusion to (B, 3072, 16, 16), three bottlenecks to (B, 2048, 8, 8), decoder [3, 4, 6] back to
(B, 1024, 16, 16), (B, 512, 32, 32), (B, 256, 64, 64) for 256x256 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.backbones import BackboneSpec


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, residual). ``stride=2`` halves H, W via the 3x3 conv."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv1x1(width, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class DeBottleneck(nn.Module):
    """Decoder bottleneck: like :class:`Bottleneck`, but ``stride=2`` doubles H, W with a 2x2 transposed conv.

    ``out_relu=False`` ends the block without ReLU: the last block of a stage whose teacher features are signed.
    """

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, out_relu: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(cin, width), nn.BatchNorm2d(width)
        if stride == 2:
            self.conv2: nn.Module = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv1x1(width, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.out_act: nn.Module = nn.ReLU() if out_relu else nn.Identity()
        self.upsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.upsample = nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 2, stride=stride, bias=False) if stride == 2 else _conv1x1(cin, cout),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_act(out + self.upsample(x))


def _width(spec: BackboneSpec, cout: int) -> int:
    planes = cout // spec.expansion
    return max(1, planes * spec.width_per_group // 64)


class OCBE(nn.Module):
    """Multi-scale feature fusion + one-class bottleneck embedding.

    Inputs ``p1 (B,c1,H/4,W/4), p2 (B,c2,H/8,W/8), p3 (B,c3,H/16,W/16)``; output ``z (B, 2*c3, H/32, W/32)``.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        self.relu = nn.ReLU(inplace=True)
        # Official: conv1 (c1->c2, s2) -> conv2 (c2->c3, s2) for the stride-4 map; conv3 (c2->c3, s2) for stride 8.
        self.conv1, self.bn1 = _conv3x3(c1, c2, 2), nn.BatchNorm2d(c2)
        self.conv2, self.bn2 = _conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
        self.conv3, self.bn3 = _conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
        cout = 2 * c3
        blocks: list[nn.Module] = [Bottleneck(3 * c3, _width(spec, cout), cout, stride=2)]
        blocks += [Bottleneck(cout, _width(spec, cout), cout) for _ in range(spec.ocbe_layers - 1)]
        self.bn_layer = nn.Sequential(*blocks)

    def forward(self, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(p1))))))
        l2 = self.relu(self.bn3(self.conv3(p2)))
        return self.bn_layer(torch.cat([l1, l2, p3], dim=1))


class Decoder(nn.Module):
    """Student decoder: ``z (B, 2*c3, H/32, W/32)`` -> ``[d1 (B,c1,H/4), d2 (B,c2,H/8), d3 (B,c3,H/16)]``."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        c1, c2, c3 = spec.channels
        n3, n2, n1 = spec.decoder_layers
        self.layer1 = self._stage(spec, 2 * c3, c3, n3)
        self.layer2 = self._stage(spec, c3, c2, n2)
        self.layer3 = self._stage(spec, c2, c1, n1)

    @staticmethod
    def _stage(spec: BackboneSpec, cin: int, cout: int, n: int) -> nn.Sequential:
        """``n`` blocks, the first one upsampling; the stage output is signed when the teacher's is."""
        w = _width(spec, cout)
        blocks = [DeBottleneck(cin, w, cout, stride=2, out_relu=not spec.signed or n > 1)]
        blocks += [DeBottleneck(cout, w, cout, out_relu=not spec.signed or i < n - 2) for i in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, z: Tensor) -> list[Tensor]:
        d3 = self.layer1(z)
        d2 = self.layer2(d3)
        d1 = self.layer3(d2)
        return [d1, d2, d3]


class IdentityProjection(nn.Module):
    """Plain RD: the OCBE sees the teacher's features unchanged."""

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:
        return [f1, f2, f3]


class Student(nn.Module):
    """The trainable path ``[f1, f2, f3] -> projection -> OCBE -> decoder -> [d1, d2, d3]``.

    Training runs this on cached teacher features (the teacher is frozen and sees no augmentation, so its outputs
    are computed once per run); it shares its submodules with :class:`ReverseDistillation`.
    """

    def __init__(self, projection: nn.Module, ocbe: OCBE, decoder: Decoder) -> None:
        super().__init__()
        self.projection, self.ocbe, self.decoder = projection, ocbe, decoder

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> list[Tensor]:
        return self.decoder(self.ocbe(*self.projection(f1, f2, f3)))


class ReverseDistillation(nn.Module):
    """Teacher (frozen) -> projection -> OCBE -> decoder.

    ``forward(image)`` returns ``(teacher_feats, student_feats)``, each ``[s4, s8, s16]`` maps; the anomaly map
    compares the *un-projected* teacher features with the decoder's output.
    """

    def __init__(self, teacher: nn.Module, spec: BackboneSpec, projection: nn.Module | None = None) -> None:
        super().__init__()
        self.teacher = teacher
        self.projection = projection if projection is not None else IdentityProjection()
        self.ocbe = OCBE(spec)
        self.decoder = Decoder(spec)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ReverseDistillation:
        super().train(mode)
        self.teacher.eval()  # BN statistics of the ImageNet teacher stay frozen
        return self

    def forward(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.teacher(image)
        proj = self.projection(*feats)
        z = self.ocbe(*proj)
        return feats, self.decoder(z)

    def student(self) -> Student:
        """The trainable path as its own module (same parameters), for training on cached teacher features."""
        return Student(self.projection, self.ocbe, self.decoder)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything but the teacher (which is rebuilt from its registry weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}
