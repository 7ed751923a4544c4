"""SimCLR augmentation policies on batched torch tensors, deterministic given a ``torch.Generator``.

A policy is a validated pydantic model; three are built in, and a YAML file can define another::

    default    the SimCLR paper's: random resized crop, horizontal flip, colour jitter (p 0.8), random greyscale
               (p 0.2), Gaussian blur (p 0.5). For parts whose colour and orientation carry no defect.
    no-color   no colour jitter, no greyscale. Use it when colour IS the defect (e.g. swapped cable insulation):
               colour jitter would teach the auxiliary to ignore exactly what matters.
    no-flip    no flips. Use it when orientation IS the defect (e.g. a flipped metal nut, a misplaced transistor).

Every op runs on the whole batch ``(B, 3, H, W)`` in ``[0, 1]`` at once with per-image random parameters drawn from
the generator (no Python loop over images). Deviations from torchvision's SimCLR pipeline, for speed and
determinism: the jitter ops run in a fixed order (brightness, contrast, saturation, hue) instead of a random one, and
hue is rotated in YIQ space instead of HSV (same effect for small shifts, linear and vectorisable).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from training.config import format_errors, read_yaml_mapping
from training.errors import ConfigError

_LUMA = (0.299, 0.587, 0.114)


class AugmentPolicy(BaseModel):
    """One SimCLR augmentation policy (also the schema of ``--augment FILE.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("custom", description="shown in logs and stored in the SimCLR checkpoint")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random resized crop: area share range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random resized crop: aspect ratio range")
    hflip_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    vflip_p: float = Field(0.0, ge=0.0, le=1.0, description="probability of a vertical flip")
    jitter_p: float = Field(0.8, ge=0.0, le=1.0, description="probability of colour jitter")
    brightness: float = Field(0.8, ge=0.0, description="brightness factor in [1 - b, 1 + b]")
    contrast: float = Field(0.8, ge=0.0, description="contrast factor in [1 - c, 1 + c]")
    saturation: float = Field(0.8, ge=0.0, description="saturation factor in [1 - s, 1 + s]")
    hue: float = Field(0.2, ge=0.0, le=0.5, description="hue shift in [-h, h] turns")
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0, description="probability of greyscale")
    blur_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="blur sigma range in pixels (at 224 px)")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentPolicy:
        for field in ("crop_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, field)
            if not 0 < lo <= hi:
                raise ValueError(f"{field}: need 0 < low <= high, got ({lo}, {hi})")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale: the high end must be <= 1, got {self.crop_scale[1]}")
        return self


POLICIES: dict[str, AugmentPolicy] = {
    "default": AugmentPolicy(name="default"),
    "no-color": AugmentPolicy(name="no-color", jitter_p=0.0, grayscale_p=0.0),
    "no-flip": AugmentPolicy(name="no-flip", hflip_p=0.0, vflip_p=0.0),
}

POLICY_HELP = (
    "default: the SimCLR paper's (crop, flip, colour jitter, greyscale, blur); "
    "no-color: no jitter/greyscale, when colour is the defect (e.g. cables); "
    "no-flip: no flips, when orientation is the defect (e.g. metal nuts, transistors); "
    "or a YAML file with the fields of training.augment.AugmentPolicy"
)


def load_policy(name_or_path: str | Path) -> AugmentPolicy:
    """A built-in policy by name, or a YAML file (unknown keys rejected, errors name the field)."""
    key = str(name_or_path)
    if key in POLICIES:
        return POLICIES[key]
    path = Path(key)
    if not path.is_file():
        raise ConfigError(f"--augment: {key!r} is neither a policy ({', '.join(POLICIES)}) nor a YAML file")
    data = read_yaml_mapping(path)
    data.setdefault("name", path.stem)
    try:
        return AugmentPolicy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path))) from None


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _bernoulli(n: int, p: float, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g) < p


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.device, x.dtype).view(-1, 1, 1, 1)


def crop_flip(x: Tensor, policy: AugmentPolicy, g: torch.Generator | None) -> Tensor:
    """Random resized crop (bilinear, back to the input size) with optional flips, as one batched ``grid_sample``."""
    b = x.shape[0]
    area = _uniform(b, *policy.crop_scale, g)
    log_r = _uniform(b, math.log(policy.crop_ratio[0]), math.log(policy.crop_ratio[1]), g)
    ratio = torch.exp(log_r)
    # crop size as a share of the side (torchvision samples in pixels and retries; clamping is the vectorised form)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    sx = torch.where(_bernoulli(b, policy.hflip_p, g), -w, w)
    sy = torch.where(_bernoulli(b, policy.vflip_p, g), -h, h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: Tensor, policy: AugmentPolicy, g: torch.Generator | None) -> Tensor:
    """Brightness, contrast, saturation, hue with per-image factors; applied to each image with ``jitter_p``."""
    b = x.shape[0]
    apply = _bcast(_bernoulli(b, policy.jitter_p, g).float(), x)
    bri = _bcast(_uniform(b, max(0.0, 1 - policy.brightness), 1 + policy.brightness, g), x)
    con = _bcast(_uniform(b, max(0.0, 1 - policy.contrast), 1 + policy.contrast, g), x)
    sat = _bcast(_uniform(b, max(0.0, 1 - policy.saturation), 1 + policy.saturation, g), x)
    hue = _uniform(b, -policy.hue, policy.hue, g) * 2 * math.pi
    y = (x * bri).clamp(0, 1)
    y = (con * y + (1 - con) * _grey(y).mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    y = (sat * y + (1 - sat) * _grey(y)).clamp(0, 1)
    # hue: rotate the chroma (I, Q) plane of YIQ by the per-image angle
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    cos, sin = torch.cos(hue).to(x.dtype), torch.sin(hue).to(x.dtype)
    rot = torch.zeros(b, 3, 3, dtype=x.dtype)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    m = (yiq2rgb @ rot @ rgb2yiq).to(x.device)  # (B, 3, 3)
    y = torch.einsum("bij,bjhw->bihw", m, y).clamp(0, 1)
    return apply * y + (1 - apply) * x


def random_grayscale(x: Tensor, policy: AugmentPolicy, g: torch.Generator | None) -> Tensor:
    apply = _bcast(_bernoulli(x.shape[0], policy.grayscale_p, g).float(), x)
    return apply * _grey(x).expand_as(x) + (1 - apply) * x


def gaussian_blur(x: Tensor, policy: AugmentPolicy, g: torch.Generator | None) -> Tensor:
    """Per-image sigma (scaled from the paper's 224 px to this size), kernel ~10% of the side, reflect borders."""
    b, c, h, w = x.shape
    apply = _bernoulli(b, policy.blur_p, g)
    scale = min(h, w) / 224.0
    sigma = _uniform(b, *policy.blur_sigma, g) * scale
    radius = max(1, int(0.05 * min(h, w)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    identity = torch.zeros_like(k)
    identity[:, radius] = 1
    k = torch.where(apply.view(-1, 1), k, identity).to(x.device)
    kk = k.repeat_interleave(c, dim=0)  # (B*C, K): depthwise, one kernel per image
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kk.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kk.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def augment(x: Tensor, policy: AugmentPolicy, g: torch.Generator | None = None) -> Tensor:
    """One SimCLR view of a batch.

    Args:
        x: images ``(B, 3, H, W)`` in ``[0, 1]`` (not normalised).
        policy: what to apply.
        g: CPU generator; the same seed gives the same views.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    y = crop_flip(x, policy, g)
    if policy.jitter_p > 0:
        y = color_jitter(y, policy, g)
    if policy.grayscale_p > 0:
        y = random_grayscale(y, policy, g)
    if policy.blur_p > 0:
        y = gaussian_blur(y, policy, g)
    return y
