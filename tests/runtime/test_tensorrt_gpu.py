"""TensorRT backend on a real GPU: engines built here from the tiny bundle, compared with ONNX Runtime.

Skips cleanly without tensorrt, pycuda or a CUDA device.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.bundle import EngineSpec, InputSpec, load_manifest, sha256_file, write_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError

pytestmark = pytest.mark.gpu
MAX_BATCH = 2


def _trt_or_skip() -> tuple[Any, Any]:
    trt = pytest.importorskip("tensorrt")
    cuda = pytest.importorskip("pycuda.driver")
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # no driver / no device
        pytest.skip(f"CUDA not usable: {exc}")
    if count == 0:
        pytest.skip("no CUDA device")
    return trt, cuda


def _build_engine(trt: Any, onnx_path: Path, engine_path: Path) -> None:
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, log)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        pytest.fail(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(t.shape)[1:]
        profile.set_shape(t.name, (1, *dims), (1, *dims), (MAX_BATCH, *dims))
    config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    assert data is not None, f"engine build failed for {onnx_path.name}"
    engine_path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    trt, cuda = _trt_or_skip()
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("trt") / "bundle"))
    m = load_manifest(bundle)
    gpu_name = str(cuda.Device(0).name())
    (bundle / "engines").mkdir()
    engines, files = [], dict(m.files)
    assert m.fused is not None
    for part in [*m.parts, m.fused]:
        rel = f"engines/{part.name}.engine"
        _build_engine(trt, bundle / part.file, bundle / rel)
        files[rel] = sha256_file(bundle / rel)
        engines.append(
            EngineSpec(
                part=part.name,
                file=rel,
                precision="fp32",
                tensorrt_version=trt.__version__,
                gpu_name=gpu_name,
                onnx_sha256=m.files[part.file],
                max_batch=MAX_BATCH,
            )
        )
    inp = InputSpec(height=m.input.height, width=m.input.width, max_batch=MAX_BATCH)
    write_manifest(bundle, m.model_copy(update={"engines": engines, "files": files, "input": inp}))
    return bundle


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("fused", [False, True])
def test_tensorrt_matches_onnxruntime(trt_bundle: Path, fused: bool) -> None:
    with (
        AnomalyModel(trt_bundle, BackendConfig(kind="tensorrt", fused=fused)) as trt_model,
        AnomalyModel(trt_bundle, BackendConfig(fused=fused)) as ort_model,
    ):
        for frame in _frames(3):
            a, b = trt_model.predict(frame), ort_model.predict(frame)
            assert a.score == pytest.approx(b.score, rel=1e-3, abs=1e-3)
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-3, atol=1e-3)
            assert list(a.timings_ms) == list(b.timings_ms)


def test_tensorrt_batch_and_intermediates_stay_shared(trt_bundle: Path) -> None:
    from runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(trt_bundle)
    x = np.random.default_rng(1).standard_normal((MAX_BATCH, 3, 64, 64)).astype(np.float32)
    with TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt")) as be:
        out, timings = be.run({"image": x})
        one, _ = be.run({"image": x[:1]})
        # teacher's f1 buffer is score's f1 input: one allocation per tensor name
        assert len(be._device) == len(be._layout)
        with pytest.raises(ValueError, match="must be"):
            be.run({"image": x[:, :, :32]})
    assert out["anomaly_map"].shape == (MAX_BATCH, 1, 64, 64) and out["score"].shape == (MAX_BATCH,)
    np.testing.assert_allclose(one["score"], out["score"][:1], rtol=1e-4, atol=1e-4)
    assert list(timings) == ["teacher", "projection", "ocbe", "decoder", "score"]


def test_cuda_graph_gives_the_same_scores(trt_bundle: Path) -> None:
    frames = _frames(4)
    with (
        AnomalyModel(trt_bundle, BackendConfig(kind="tensorrt", cuda_graph=True)) as graph_model,
        AnomalyModel(trt_bundle, BackendConfig(kind="tensorrt")) as plain,
    ):
        got = [graph_model.predict(f) for f in frames]
        want = [plain.predict(f) for f in frames]
    for a, b in zip(got, want, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
    # After the first (capturing) run the graph replays as one stage, unless this pycuda cannot capture.
    assert "cuda_graph" in got[-1].timings_ms or "teacher" in got[-1].timings_ms


def test_engine_from_another_tensorrt_is_refused(trt_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(trt_bundle, tmp_path / "b"))
    m = load_manifest(bundle)
    engines = [e.model_copy(update={"tensorrt_version": "8.6.1"}) for e in m.engines]
    write_manifest(bundle, m.model_copy(update={"engines": engines}))
    with pytest.raises(BundleError, match=r"installed is .*rebuild with `rdedge build-engines"):
        AnomalyModel(bundle, BackendConfig(kind="tensorrt"))
