"""Frame -> model input, exactly the steps of :class:`runtime.bundle.PreprocessSpec` (training uses the same).

Order: ROI crop (source pixels) -> 16-bit to 8-bit -> one ``cv2.resize`` to (width, height) -> channel order
(grey is broadcast to three channels, BGR swapped to RGB when ``color == "rgb"``) -> ``x * scale`` ->
``(x - mean) / std`` -> CHW with a batch axis. Resizing before the channel swap and grey broadcast gives the same
numbers as the documented order (both are per-channel) while resizing fewer bytes. The two affine steps are folded
into one multiply-add per channel, written straight into the NCHW output.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from runtime.bundle import InputSpec, PreprocessSpec
from runtime.config import RoiConfig

logger = logging.getLogger(__name__)

_INTERPOLATION = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}


def crop_roi(frame: np.ndarray, roi: RoiConfig | None) -> np.ndarray:
    """Return the ROI view of ``frame`` (no copy); raise ``ValueError`` if the ROI is not inside the frame.

    Args:
        frame: image, shape ``(H, W)`` or ``(H, W, C)``.
        roi: crop in source pixels, or ``None`` for the whole frame.
    """
    if roi is None:
        return frame
    h, w = frame.shape[:2]
    if roi.x + roi.width > w or roi.y + roi.height > h:
        raise ValueError(
            f"roi x={roi.x} y={roi.y} width={roi.width} height={roi.height} lies outside the {w}x{h} frame "
            f"(needs x+width <= {w} and y+height <= {h})"
        )
    return frame[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]


def to_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 unchanged; uint16 scaled by 255/65535 with rounding (full 16-bit range -> 0..255)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
    raise ValueError(f"frame dtype must be uint8 or uint16, got {img.dtype}")


class Preprocessor:
    """Turn a camera frame into the model's ``(1, 3, H, W)`` float32 input.

    Args:
        spec: the bundle's preprocessing (colour order, interpolation, scale, mean, std).
        input: the bundle's input spec (target height and width).
        roi: default crop in source pixels, applied before resizing; ``__call__`` can override it.
    """

    def __init__(self, spec: PreprocessSpec, input: InputSpec, roi: RoiConfig | None = None) -> None:
        self.spec = spec
        self.input = input
        self.roi = roi
        self._size = (input.width, input.height)  # cv2 wants (width, height)
        self._interp = _INTERPOLATION[spec.interpolation]
        mean = np.asarray(spec.mean, dtype=np.float64)
        std = np.asarray(spec.std, dtype=np.float64)
        # (x * scale - mean) / std == x * gain + bias, per output channel (RGB or BGR order as in spec).
        self._gain = [float(g) for g in spec.scale / std]
        self._bias = [float(b) for b in -mean / std]
        # Output channel c reads source (BGR) channel _src[c].
        self._src = (2, 1, 0) if spec.color == "rgb" else (0, 1, 2)

    def __call__(self, frame: np.ndarray, roi: RoiConfig | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Preprocess one frame.

        Args:
            frame: uint8 (or uint16) image as OpenCV decodes it: ``(H, W)`` grey, ``(H, W, 1)``, ``(H, W, 3)`` BGR
                or ``(H, W, 4)`` BGRA (alpha ignored).
            roi: crop for this frame; ``None`` uses the constructor's ``roi``.
            out: optional preallocated ``(1, 3, height, width)`` float32 C-contiguous array to write into.

        Returns:
            ``(1, 3, height, width)`` float32, C-contiguous (``out`` when given).

        Raises:
            ValueError: unsupported shape/dtype, or a ROI outside the frame.
        """
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4))):
            raise ValueError(f"frame must be HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA), got shape {frame.shape}")
        img = to_uint8(crop_roi(frame, roi if roi is not None else self.roi))
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if (img.shape[1], img.shape[0]) != self._size:
            img = cv2.resize(img, self._size, interpolation=self._interp)
        h, w = self.input.height, self.input.width
        if out is None:
            out = np.empty((1, 3, h, w), dtype=np.float32)
        elif out.shape != (1, 3, h, w) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape (1, 3, {h}, {w}), got {out.shape}")
        for c in range(3):
            src = img if img.ndim == 2 else img[:, :, self._src[c]]
            np.multiply(src, np.float32(self._gain[c]), out=out[0, c], dtype=np.float32)
            out[0, c] += np.float32(self._bias[c])
        return out
