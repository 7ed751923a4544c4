"""Augmentation policies do what their names say, deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.augment import POLICIES, augment, load_policy
from training.errors import ConfigError

N, S = 64, 32


def _gradient_batch() -> torch.Tensor:
    """Grey images that brighten from left to right (mirrored, they would darken)."""
    ramp = torch.linspace(0.05, 0.95, S).view(1, 1, 1, S)
    return ramp.expand(N, 3, S, S).contiguous()


def _left_right(y: torch.Tensor) -> torch.Tensor:
    """Per image: mean of the right half minus mean of the left half."""
    return y[..., S // 2 :].mean(dim=(1, 2, 3)) - y[..., : S // 2].mean(dim=(1, 2, 3))


def _colour_batch() -> torch.Tensor:
    """Colour images whose every pixel has R:G:B = 0.9:0.5:0.2 (varying brightness and texture)."""
    g = torch.Generator().manual_seed(1)
    intensity = 0.2 + 0.8 * torch.rand(N, 1, S, S, generator=g)
    return intensity * torch.tensor([0.9, 0.5, 0.2]).view(1, 3, 1, 1)


def test_no_flip_never_mirrors() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        y = augment(_gradient_batch(), POLICIES["no-flip"], g)
        assert (_left_right(y) > 0).all()


def test_default_does_flip() -> None:
    # the check above can fail: with the paper's policy about half of the images come out mirrored
    y = augment(_gradient_batch(), POLICIES["default"], torch.Generator().manual_seed(0))
    mirrored = int((_left_right(y) < 0).sum())
    assert 0.25 * N < mirrored < 0.75 * N


def test_no_color_keeps_channel_ratios() -> None:
    y = augment(_colour_batch(), POLICIES["no-color"], torch.Generator().manual_seed(0))
    g = y[:, 1]
    torch.testing.assert_close(y[:, 0] / g, torch.full_like(g, 0.9 / 0.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[:, 2] / g, torch.full_like(g, 0.2 / 0.5), rtol=1e-4, atol=1e-4)


def test_default_changes_colour() -> None:
    y = augment(_colour_batch(), POLICIES["default"], torch.Generator().manual_seed(0))
    ratio = (y[:, 0] / y[:, 1].clamp(min=1e-6)).mean(dim=(1, 2))
    assert ((ratio - 1.8).abs() > 0.05).float().mean() > 0.5  # jitter (p 0.8) or greyscale (p 0.2)


def test_deterministic_by_seed_and_in_range() -> None:
    x = _colour_batch()
    a = augment(x, POLICIES["default"], torch.Generator().manual_seed(5))
    b = augment(x, POLICIES["default"], torch.Generator().manual_seed(5))
    c = augment(x, POLICIES["default"], torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 + 1e-6


def test_yaml_policy(tmp_path: Path) -> None:
    p = tmp_path / "gentle.yaml"
    p.write_text("hflip_p: 0.0\nvflip_p: 0.0\ncrop_scale: [0.6, 1.0]\njitter_p: 0.0\ngrayscale_p: 0.0\n")
    policy = load_policy(p)
    assert policy.name == "gentle" and policy.crop_scale == (0.6, 1.0)
    y = augment(_gradient_batch(), policy, torch.Generator().manual_seed(0))
    assert (_left_right(y) > 0).all()


def test_yaml_policy_errors_name_the_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("hflip_p: 0.5\nrotate: 90\n")
    with pytest.raises(ConfigError, match="rotate"):
        load_policy(p)
    p.write_text("hflip_p: 1.5\n")
    with pytest.raises(ConfigError, match="hflip_p"):
        load_policy(p)
    with pytest.raises(ConfigError, match="no-color"):
        load_policy("no-colour")
