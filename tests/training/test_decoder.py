"""The decoder sized to its teacher: signed stage outputs for EfficientNet-Lite, ReLU outputs for ResNets, the
official wide_resnet50_2 shapes, and the Student that trains on cached features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.backbones import get_spec
from training.build import build_model
from training.config import parse_train_config
from training.model import OCBE, Decoder


def _model(backbone: str, signed: bool | None = None) -> nn.Module:
    model = {"backbone": backbone, "pretrained": False, "signed_decoder": signed}
    return build_model(
        parse_train_config({"data": {"image_size": 64}, "model": {"projection": "identity", **model}})
    ).eval()


def _decode(model: nn.Module) -> list[torch.Tensor]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)[1]


def _out_acts(dec: Decoder) -> list[list[bool]]:
    """Per stage, per block: does the block end with a ReLU?"""
    return [[isinstance(b.out_act, nn.ReLU) for b in stage] for stage in (dec.layer1, dec.layer2, dec.layer3)]


def test_efficientnet_lite0_decoder_is_signed_and_sized_to_the_teacher() -> None:
    spec = get_spec("efficientnet_lite0")
    assert spec.signed and spec.width_per_group == 256 and spec.decoder_layers == (2, 2, 2) and spec.ocbe_layers == 2
    model = _model("efficientnet_lite0")
    assert _out_acts(model.decoder) == [[True, False]] * 3  # only a stage's last block drops the ReLU
    assert len(model.ocbe.bn_layer) == 2
    assert model.decoder.layer1[0].conv1.out_channels == 112  # inner width == output width (planes * 256 / 64)
    for d in _decode(model):
        assert (d < 0).any(), "a signed teacher needs a student that can go negative"


def test_resnet18_decoder_ends_with_relu() -> None:
    model = _model("resnet18")
    assert not get_spec("resnet18").signed
    assert all(all(stage) for stage in _out_acts(model.decoder))
    for d in _decode(model):
        assert (d >= 0).all()


@pytest.mark.parametrize(("backbone", "signed"), [("efficientnet_lite0", False), ("resnet18", True)])
def test_signed_decoder_override(backbone: str, signed: bool) -> None:
    outs = _decode(_model(backbone, signed))
    assert all(bool((d < 0).any()) == signed for d in outs)


def test_wide_resnet50_2_decoder_and_ocbe_parameter_shapes_are_the_official_ones() -> None:
    """Official RD (de_wide_resnet50_2, BN_layer with width_per_group 128): unchanged by the signed-decoder work."""
    spec = get_spec("wide_resnet50_2")
    assert not spec.signed and spec.decoder_layers == (3, 4, 6) and spec.ocbe_layers == 3
    ocbe, dec = OCBE(spec), Decoder(spec)
    shapes = {k: tuple(v.shape) for k, v in {**ocbe.state_dict(), **dec.state_dict()}.items() if k.endswith("weight")}
    want = {
        "conv1.weight": (512, 256, 3, 3),
        "conv2.weight": (1024, 512, 3, 3),
        "conv3.weight": (1024, 512, 3, 3),
        "bn_layer.0.conv1.weight": (1024, 3072, 1, 1),
        "bn_layer.0.conv2.weight": (1024, 1024, 3, 3),
        "bn_layer.0.conv3.weight": (2048, 1024, 1, 1),
        "bn_layer.0.downsample.0.weight": (2048, 3072, 1, 1),
        "bn_layer.2.conv1.weight": (1024, 2048, 1, 1),
        "layer1.0.conv1.weight": (512, 2048, 1, 1),
        "layer1.0.conv2.weight": (512, 512, 2, 2),  # ConvTranspose2d: (in, out, k, k)
        "layer1.0.conv3.weight": (1024, 512, 1, 1),
        "layer1.0.upsample.0.weight": (2048, 1024, 2, 2),
        "layer1.2.conv2.weight": (512, 512, 3, 3),
        "layer2.0.conv1.weight": (256, 1024, 1, 1),
        "layer2.3.conv3.weight": (512, 256, 1, 1),
        "layer3.0.conv1.weight": (128, 512, 1, 1),
        "layer3.0.upsample.0.weight": (512, 256, 2, 2),
        "layer3.5.conv3.weight": (256, 128, 1, 1),
    }
    assert {k: shapes[k] for k in want} == want
    assert "bn_layer.3.conv1.weight" not in shapes and "layer3.6.conv1.weight" not in shapes
    assert all(all(stage) for stage in _out_acts(dec))
    # the official code's counts (its BN_layer and de_wide_resnet50_2 rebuilt with torchvision blocks)
    assert sum(p.numel() for p in ocbe.parameters()) == 58_885_120
    assert sum(p.numel() for p in dec.parameters()) == 24_917_504


def test_student_shares_parameters_and_decodes_cached_features() -> None:
    model = _model("efficientnet_lite0")
    student = model.student()
    ids = {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert {id(p) for p in student.parameters()} == ids
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, recon = model(x)
        for a, b in zip(student(*feats), recon, strict=True):
            assert torch.equal(a, b)
