"""TensorRT engines from the tiny exported bundle, checked against FP32 ONNX Runtime (GPU, tensorrt, cuda-python).

Tolerances on the image scores of the tiny run's test images, relative to the peak score: FP16 engines (score part
FP32) within 2e-2 (``FP16_SCORE_TOL``); FP32 engines within 1e-4 (TF32 cleared: with it, ~1e-3). Also checked on
the real builder: profile opt = batch 1, the fused engine, a rejected timing cache is replaced, FP32 pinning only on
float layers, and ``gpu_id`` (with two GPUs).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from export.parity import FP16_SCORE_TOL, errors

HAVE_PACKAGES = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("cuda") is not None


def _device_count() -> int:
    if not HAVE_PACKAGES:
        return 0
    from runtime.backends import cuda_rt

    try:
        return cuda_rt.device_count()
    except Exception:  # noqa: BLE001 - no driver
        return 0


# Checked before any fixture runs, so a box without a GPU does not train the tiny run for nothing.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_PACKAGES, reason="needs tensorrt and cuda-python"),
    pytest.mark.skipif(_device_count() == 0, reason="no CUDA device"),
]


def _scores(bundle: Path, images: list[Path], **backend: Any) -> np.ndarray:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel

    with AnomalyModel(bundle, BackendConfig(**backend)) as model:
        return np.array([model.predict(cv2.imread(str(p))).score for p in images], np.float32)


def _copy(exported_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize(("precision", "tol"), [("fp16", FP16_SCORE_TOL), ("fp32", 1e-4)])
def test_engines_match_onnxruntime(
    exported_bundle: Path, tiny_run: tuple[Path, Path], tmp_path: Path, precision: str, tol: float
) -> None:
    from export.tensorrt_build import build_engines

    bundle = _copy(exported_bundle, tmp_path)
    manifest = build_engines(bundle, precision=precision, max_batch=2)  # type: ignore[arg-type]
    assert [e.part for e in manifest.engines] == ["teacher", "projection", "ocbe", "decoder", "score", "fused"]
    assert {e.precision for e in manifest.engines if e.part in ("score", "fused")} == {"fp32"}
    images = sorted((tiny_run[1] / "test").rglob("*.png"))
    ref = _scores(bundle, images)
    for fused in (False, True):
        got = _scores(bundle, images, kind="tensorrt", fused=fused)
        _, rel = errors([ref], [got])
        # the fused engine is FP32 whatever --precision says
        assert rel <= (tol if not fused else 1e-4), (fused, rel)


def test_profile_is_tuned_for_batch_one_and_cache_survives_rejection(exported_bundle: Path, tmp_path: Path) -> None:
    import tensorrt as trt

    from export.tensorrt_build import build_engines, timing_cache_filename
    from runtime.backends import cuda_rt
    from runtime.backends.tensorrt import trt_logger

    bundle = _copy(exported_bundle, tmp_path)
    m = build_engines(bundle, precision="fp32", max_batch=3)
    gpu = cuda_rt.device_identity(0)
    cache = bundle / timing_cache_filename(trt.__version__, gpu)
    assert cache.is_file() and cache.stat().st_size > 0
    runtime = trt.Runtime(trt_logger(trt))
    teacher = next(e for e in m.engines if e.part == "teacher")
    engine = runtime.deserialize_cuda_engine((bundle / teacher.file).read_bytes())
    lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape("image", 0))
    assert (lo[0], opt[0], hi[0]) == (1, 1, 3)
    # garbage in the cache file: TensorRT rejects it, the build goes on with a fresh cache and rewrites it
    cache.write_bytes(b"not a timing cache" * 10)
    m2 = build_engines(bundle, precision="fp32", max_batch=3)
    assert len(m2.engines) == len(m.engines) and cache.read_bytes()[:18] != b"not a timing cache"


def test_fp32_pinning_leaves_integer_and_shape_layers_alone(exported_bundle: Path) -> None:
    import tensorrt as trt

    from export.tensorrt_build import _layer_facts, _pin_fp32_layers, pin_to_fp32
    from runtime.backends.tensorrt import trt_logger

    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no weakly typed networks")
    builder = trt.Builder(trt_logger(trt))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger(trt))
    assert parser.parse_from_file(str(exported_bundle / "score.onnx"))
    facts = [_layer_facts(trt, network.get_layer(i)) for i in range(network.num_layers)]
    n = _pin_fp32_layers(trt, network)
    assert n == sum(pin_to_fp32(f) for f in facts) and n > 0  # the score part has reductions and divisions
    for i, f in enumerate(facts):
        layer = network.get_layer(i)
        if layer.precision_is_set:
            assert set(f.output_dtypes) <= {"FLOAT", "HALF"} and all(f.outputs_are_execution), f


@pytest.mark.skipif(_device_count() < 2, reason="needs two CUDA devices")
def test_engines_are_built_on_gpu_id(exported_bundle: Path, tmp_path: Path) -> None:
    from export.tensorrt_build import build_engines
    from runtime.backends import cuda_rt
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel

    bundle = _copy(exported_bundle, tmp_path)
    m = build_engines(bundle, precision="fp32", max_batch=1, gpu_id=1)
    gpu = cuda_rt.device_identity(1)
    assert {(e.gpu_name, e.compute_capability, e.sm_count) for e in m.engines} == {(gpu.name, gpu.cc, gpu.sm_count)}
    with AnomalyModel(bundle, BackendConfig(kind="tensorrt", gpu_id=1)) as model:
        model.predict(np.zeros((64, 64, 3), np.uint8))
