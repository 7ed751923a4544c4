"""Synthetic defects for the validation signal: deterministic, exact masks, every kind, values in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.synthetic import KINDS, make_defect, synthesize


@pytest.fixture(scope="module")
def goods() -> np.ndarray:
    """Four textured ``(64, 64, 3)`` images in [0, 1] (smooth noise, as parts look at this scale)."""
    rng = np.random.default_rng(0)
    coarse = rng.random((4, 8, 8, 3)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.clip(0.2 + 0.6 * img + 0.05 * rng.standard_normal(img.shape), 0, 1).astype(np.float32)


def test_deterministic_by_seed(goods: np.ndarray) -> None:
    a, ma, ka = synthesize(goods, per_image=3, seed=5)
    b, mb, kb = synthesize(goods, per_image=3, seed=5)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and ka == kb
    c, mc, _ = synthesize(goods, per_image=3, seed=6)
    assert not np.array_equal(mc, ma)


def test_shapes_kinds_values_and_exact_masks(goods: np.ndarray) -> None:
    out, masks, kinds = synthesize(goods, per_image=3, seed=0)
    assert out.shape == (12, 64, 64, 3) and out.dtype == np.float32
    assert masks.shape == (12, 64, 64) and masks.dtype == bool
    assert set(kinds) == set(KINDS) and len(kinds) == 12
    assert out.min() >= 0.0 and out.max() <= 1.0
    src = np.repeat(goods, 3, axis=0)  # defect j is made from image j // per_image
    for j in range(len(out)):
        diff = np.abs(out[j] - src[j]).max(axis=2)
        assert masks[j].sum() >= 4, f"empty mask for {kinds[j]}"
        assert (diff[masks[j]] > 0.02).all(), "a mask pixel that did not change"
        # outside the mask at most sub-threshold changes (pixels the defect touched by less than 0.02)
        assert diff[~masks[j]].max() <= 0.02 + 1e-6, kinds[j]
        assert (diff[~masks[j]] == 0).mean() > 0.5, "most of the image is untouched"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_its_region(goods: np.ndarray, kind: str) -> None:
    rng, g = np.random.default_rng(1), torch.Generator().manual_seed(1)
    out, mask = make_defect(goods[0], goods[1], kind, rng, g)
    assert out.shape == goods[0].shape and mask.shape == (64, 64) and mask.any()
    diff = np.abs(out - goods[0]).max(axis=2)
    assert diff[~mask].max() <= 0.02 + 1e-6 and diff[mask].min() > 0.02
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_single_image_is_its_own_texture_source_and_bad_kind_is_refused(goods: np.ndarray) -> None:
    out, masks, kinds = synthesize(goods[:1], per_image=4, seed=0)
    assert len(out) == 4 and all(m.sum() >= 4 for m in masks) and set(kinds) == set(KINDS)
    with pytest.raises(ValueError, match="unknown synthetic defect kind"):
        make_defect(goods[0], goods[1], "smudge", np.random.default_rng(0), torch.Generator())


def test_tall_images_get_defects_inside_them_of_every_kind() -> None:
    rng = np.random.default_rng(1)
    tall = rng.random((3, 160, 64, 3)).astype(np.float32) * 0.5 + 0.25
    out, masks, kinds = synthesize(tall, per_image=8, seed=5)
    assert out.shape == (24, 160, 64, 3) and masks.shape == (24, 160, 64)
    assert set(kinds) == set(KINDS) and all(m.sum() >= 4 for m in masks)
    for img, mask, src in zip(out, masks, np.repeat(tall, 8, axis=0), strict=True):
        changed = np.abs(img - src).max(axis=2) > 0.02
        assert not (mask & ~changed).any()  # every mask pixel changed
    # defects reach the lower half of a tall image too (positions are drawn over the whole height)
    assert masks[:, 100:].any()
