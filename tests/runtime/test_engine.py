"""AnomalyModel on the real tiny bundle (ONNX Runtime, CPU), plus the heatmap overlay."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.bundle import load_manifest
from runtime.config import BackendConfig, RoiConfig
from runtime.engine import AnomalyModel, Prediction
from runtime.errors import BundleError
from runtime.overlay import encode_jpeg, heatmap_u8, overlay_heatmap

CHAIN_KEYS = ["preprocess", "teacher", "projection", "ocbe", "decoder", "score", "total"]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Iterator[AnomalyModel]:
    with AnomalyModel(tiny_bundle, BackendConfig(threads=1)) as m:
        yield m


def _frame(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_returns_a_frozen_prediction_with_timings(model: AnomalyModel) -> None:
    p = model.predict(_frame(0, 120, 160))
    assert isinstance(p, Prediction)
    assert p.anomaly_map.shape == (64, 64) and p.anomaly_map.dtype == np.float32
    assert p.score == pytest.approx(float(p.anomaly_map.max()), rel=1e-5)
    assert p.is_ng == (p.score >= model.threshold)
    assert list(p.timings_ms) == CHAIN_KEYS
    assert p.timings_ms["total"] >= sum(v for k, v in p.timings_ms.items() if k != "total") * 0.99
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.score = 0.0  # type: ignore[misc]


def test_fused_timings_and_same_scores(tiny_bundle: Path, model: AnomalyModel) -> None:
    frame = _frame(1)
    with AnomalyModel(tiny_bundle, BackendConfig(fused=True, threads=1)) as fused:
        p = fused.predict(frame)
    assert list(p.timings_ms) == ["preprocess", "fused", "total"]
    assert p.score == pytest.approx(model.predict(frame).score, rel=1e-5, abs=1e-5)


def test_threshold_default_override_and_roughly_half_ng(tiny_bundle: Path, model: AnomalyModel) -> None:
    manifest = load_manifest(tiny_bundle)
    assert model.threshold == manifest.threshold.value
    assert model.model_id == manifest.model_id == model.manifest.model_id
    ng = sum(model.predict(_frame(100 + i)).is_ng for i in range(24))
    assert 4 <= ng <= 20  # the helper sets the threshold at the median score of noise images
    with AnomalyModel(tiny_bundle, BackendConfig(), verify=False, threshold=-1.0) as always_ng:
        assert always_ng.threshold == -1.0
        assert always_ng.predict(_frame(2)).is_ng


def test_roi_predict_equals_predicting_the_crop(model: AnomalyModel) -> None:
    frame = _frame(3, 200, 300)
    roi = RoiConfig(x=40, y=20, width=128, height=128)
    a = model.predict(frame, roi=roi)
    b = model.predict(np.ascontiguousarray(frame[20:148, 40:168]))
    assert a.score == b.score
    with pytest.raises(ValueError, match="outside the 300x200 frame"):
        model.predict(frame, roi=RoiConfig(x=250, y=0, width=100, height=10))


def test_grey_frame_and_warmup(model: AnomalyModel) -> None:
    model.warmup(1)
    grey = _frame(4)[:, :, 0]
    assert model.predict(grey).score == model.predict(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)).score


def test_tampered_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    with open(bundle / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder.onnx: sha256 mismatch"):
        AnomalyModel(bundle, BackendConfig())


def test_missing_bundle_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle directory not found"):
        AnomalyModel(tmp_path / "nope", BackendConfig())


def test_close_is_idempotent_and_final(tiny_bundle: Path) -> None:
    m = AnomalyModel(tiny_bundle, BackendConfig())
    m.close()
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.predict(_frame(5))


# ------------------------------------------------------------------------------------------------------ overlay
def test_heatmap_scale_puts_threshold_mid_scale() -> None:
    amap = np.array([[0.0, 1.0, 2.0, 5.0]], np.float32)
    np.testing.assert_array_equal(heatmap_u8(amap, threshold=1.0), [[0, 128, 255, 255]])


def test_overlay_resizes_blends_and_encodes() -> None:
    frame = np.full((120, 160, 3), 100, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[32:, 32:] = 4.0  # hot quadrant: bottom right
    out = overlay_heatmap(frame, amap, threshold=1.0, alpha=0.5)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    jet = cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_JET)[0]
    np.testing.assert_allclose(out[5, 5], (jet[0].astype(int) + 100) / 2, atol=1)  # cold: JET(0) half blended
    np.testing.assert_allclose(out[115, 155], (jet[1].astype(int) + 100) / 2, atol=1)  # hot: JET(255)
    assert overlay_heatmap(frame[:, :, 0], amap, 1.0).shape == (120, 160, 3)  # grey frames are accepted
    data = encode_jpeg(out, quality=80)
    assert data[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == out.shape
