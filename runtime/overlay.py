"""Heatmap overlays for NG alerts and JPEG encoding.

Colour rule: the anomaly map is mapped linearly from ``[0, 2 * threshold]`` to ``[0, 255]`` (clipped) and coloured
with ``COLORMAP_JET``, so the threshold sits at the middle of the scale (green) and equal colours mean equal scores on
every frame, unlike per-frame min/max normalisation, which paints even a perfect part red somewhere.
"""

from __future__ import annotations

import cv2
import numpy as np

from runtime.preprocess import to_uint8


def heatmap_u8(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """``(H, W)`` float map -> ``(H, W)`` uint8 with ``0 -> 0``, ``threshold -> 128``, ``>= 2*threshold -> 255``."""
    top = 2.0 * threshold if threshold > 0 else max(float(np.max(anomaly_map)), 1e-12)
    scaled = np.clip(anomaly_map.astype(np.float32) * np.float32(255.0 / top), 0.0, 255.0)
    return np.rint(scaled).astype(np.uint8)


def overlay_heatmap(frame_bgr: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET heatmap of ``anomaly_map`` over the frame.

    Args:
        frame_bgr: uint8 ``(H, W, 3)`` BGR (grey, BGRA and uint16 are converted) -- the frame, or the ROI crop
            the map was computed on.
        anomaly_map: ``(h, w)`` float map at model resolution; resized (bilinear) to the frame size.
        threshold: the NG threshold (score units); see the module docstring for the colour rule.
        alpha: heatmap weight in ``[0, 1]``.

    Returns:
        New uint8 ``(H, W, 3)`` BGR image.
    """
    frame_bgr = to_uint8(frame_bgr)  # 16-bit cameras: scaled to 8 bit like the model input
    if frame_bgr.ndim == 2 or (frame_bgr.ndim == 3 and frame_bgr.shape[2] == 1):
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    elif frame_bgr.shape[2] == 4:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_BGRA2BGR)
    h, w = frame_bgr.shape[:2]
    amap = anomaly_map.reshape(anomaly_map.shape[-2:])
    if amap.shape != (h, w):
        amap = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(heatmap_u8(amap, threshold), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, float(alpha), frame_bgr, 1.0 - float(alpha), 0.0)


def encode_jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    """Encode a uint8 BGR (or grey) image as JPEG bytes with ``quality`` in 1..100."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cv2.imencode failed for an image of shape {img.shape} dtype {img.dtype}")
    return buf.tobytes()
