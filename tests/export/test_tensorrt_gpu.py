"""TensorRT engines from the tiny bundle, checked against FP32 ONNX Runtime (GPU + tensorrt + pycuda only).

Tolerances on the image scores of the tiny run's test images, relative to the peak score: FP16 engines (score part
FP32) within 2e-2 (``FP16_SCORE_TOL``); FP32 engines within 1e-3.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.parity import FP16_SCORE_TOL, errors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None,
        reason="needs tensorrt and pycuda",
    ),
]


def _scores(bundle: Path, kind: str, images: list[Path]) -> np.ndarray:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel

    with AnomalyModel(bundle, BackendConfig(kind=kind)) as model:  # type: ignore[arg-type]
        return np.array([model.predict(cv2.imread(str(p))).score for p in images], np.float32)


@pytest.mark.parametrize(("precision", "tol"), [("fp16", FP16_SCORE_TOL), ("fp32", 1e-3)])
def test_engines_match_onnxruntime(
    exported_bundle: Path, tiny_run: tuple[Path, Path], tmp_path: Path, precision: str, tol: float
) -> None:
    from export.tensorrt_build import build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    manifest = build_engines(bundle, precision=precision, max_batch=2)  # type: ignore[arg-type]
    assert [e.part for e in manifest.engines] == ["teacher", "projection", "ocbe", "decoder", "score"]
    assert manifest.part("score") and {e.precision for e in manifest.engines if e.part == "score"} == {"fp32"}
    images = sorted((tiny_run[1] / "test").rglob("*.png"))
    ref = _scores(bundle, "onnxruntime", images)
    got = _scores(bundle, "tensorrt", images)
    _, rel = errors([ref], [got])
    assert rel <= tol, rel
