"""Preprocessor: hand-computed pixels, every supported frame layout, ROI handling."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.bundle import InputSpec, PreprocessSpec
from runtime.config import RoiConfig
from runtime.preprocess import Preprocessor

IMAGENET = PreprocessSpec(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
SIMPLE = PreprocessSpec(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def _pre(spec: PreprocessSpec = IMAGENET, h: int = 4, w: int = 4, roi: RoiConfig | None = None) -> Preprocessor:
    return Preprocessor(spec, InputSpec(height=h, width=w), roi)


def test_known_pixels_bgr_to_rgb_imagenet() -> None:
    frame = np.empty((4, 4, 3), np.uint8)
    frame[...] = (10, 20, 30)  # B, G, R
    x = _pre()(frame)
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    # channel 0 is R (30), normalised with the R mean/std
    expected = [(30 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (10 / 255 - 0.406) / 0.225]
    for c in range(3):
        np.testing.assert_allclose(x[0, c], expected[c], rtol=0, atol=1e-5)


def test_bgr_colour_order_is_kept_when_asked() -> None:
    spec = PreprocessSpec(color="bgr", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], scale=1.0)
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[..., 0] = 7
    x = _pre(spec)(frame)
    assert x[0, 0, 0, 0] == 7 and x[0, 2, 0, 0] == 0


def test_linear_downscale_by_two_averages_2x2_blocks() -> None:
    # 4x4 grey with distinct 2x2 blocks -> 2x2; INTER_LINEAR (half-pixel centres) averages each block.
    grey = np.array([[0, 100, 200, 200], [100, 0, 200, 200], [40, 40, 80, 120], [40, 40, 120, 80]], np.uint8)
    x = _pre(SIMPLE, 2, 2)(grey)
    blocks = np.array([[50, 200], [40, 100]], np.float64)
    np.testing.assert_allclose(x[0, 0], (blocks / 255 - 0.5) / 0.25, atol=1e-5)


def test_grey_hw1_bgr_and_bgra_agree() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    bgr = np.repeat(grey[:, :, None], 3, axis=2)
    bgra = np.concatenate([bgr, np.full_like(grey[:, :, None], 17)], axis=2)
    pre = _pre(IMAGENET, 16, 16)
    ref = pre(bgr)
    np.testing.assert_array_equal(pre(grey), ref)
    np.testing.assert_array_equal(pre(grey[:, :, None]), ref)
    np.testing.assert_array_equal(pre(bgra), ref)


def test_uint16_is_scaled_to_8_bit() -> None:
    levels = np.array([0, 1, 128, 255], np.uint16)
    frame16 = np.repeat((levels * 257).reshape(1, 4), 4, axis=0)
    frame8 = np.repeat(levels.astype(np.uint8).reshape(1, 4), 4, axis=0)
    pre = _pre(SIMPLE)
    np.testing.assert_array_equal(pre(frame16), pre(frame8))


def test_roi_crops_before_resize() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    roi = RoiConfig(x=100, y=50, width=64, height=32)
    pre = _pre(IMAGENET, 16, 32)
    np.testing.assert_array_equal(pre(frame, roi=roi), pre(frame[50:82, 100:164]))
    np.testing.assert_array_equal(_pre(IMAGENET, 16, 32, roi=roi)(frame), pre(frame[50:82, 100:164]))


@pytest.mark.parametrize(
    "roi", [RoiConfig(x=600, y=0, width=64, height=10), RoiConfig(x=0, y=400, width=10, height=100)]
)
def test_roi_outside_frame_is_a_clear_error(roi: RoiConfig) -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    with pytest.raises(ValueError, match=r"roi x=\d+ y=\d+ width=\d+ height=\d+ lies outside the 640x480 frame"):
        _pre()(frame, roi=roi)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (4,), (2, 4, 4, 3)])
def test_unsupported_shapes_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="frame must be"):
        _pre()(np.zeros(shape, np.uint8))


def test_float_frames_are_rejected() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        _pre()(np.zeros((4, 4, 3), np.float32))


def test_preallocated_output_is_filled_in_place() -> None:
    out = np.zeros((1, 3, 4, 4), np.float32)
    frame = np.full((8, 8, 3), 200, np.uint8)
    res = _pre()(frame, out=out)
    assert res is out
    np.testing.assert_array_equal(out, _pre()(frame))
    with pytest.raises(ValueError, match="out must be"):
        _pre()(frame, out=np.zeros((1, 3, 5, 4), np.float32))
