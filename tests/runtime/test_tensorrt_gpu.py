"""TensorRT backend on a real GPU: engines built here by ``rdedge build-engines``'s code, compared with ONNX Runtime.

Each test checks one of the GPU-path fixes of issue 15 (CUDA graphs through cuda-python, max batch from the
engines' profile, one shared activation buffer, freeing everything, one process-wide logger, the fused engine).
Skips cleanly without tensorrt, cuda-python or a CUDA device.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import load_manifest, write_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from runtime.errors import BundleError, RdedgeError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None,
        reason="needs tensorrt and cuda-python",
    ),
]
MAX_BATCH = 2


def _device_or_skip() -> None:
    from runtime.backends import cuda_rt

    try:
        n = cuda_rt.device_count()
    except Exception as exc:  # noqa: BLE001 - no driver
        pytest.skip(f"CUDA not usable: {exc}")
    if n == 0:
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with FP32 engines for the five parts and the fused graph (batch 1..2)."""
    _device_or_skip()
    from export.tensorrt_build import build_engines

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("trt") / "bundle"))
    m = build_engines(bundle, precision="fp32", max_batch=MAX_BATCH)
    assert [e.part for e in m.engines] == ["teacher", "projection", "ocbe", "decoder", "score", "fused"]
    assert all(e.compute_capability and e.sm_count for e in m.engines)
    return bundle


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("fused", [False, True])
def test_tensorrt_matches_onnxruntime(trt_bundle: Path, fused: bool) -> None:
    # FP32 engines without TF32: within 1e-4 of ONNX Runtime's CPU FP32 (TF32 would be ~1e-3)
    with (
        AnomalyModel(trt_bundle, BackendConfig(kind="tensorrt", fused=fused)) as trt_model,
        AnomalyModel(trt_bundle, BackendConfig(fused=fused)) as ort_model,
    ):
        for frame in _frames(3):
            a, b = trt_model.predict(frame), ort_model.predict(frame)
            assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-6)
            peak = float(np.abs(b.anomaly_map).max())
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4 * peak)
            assert list(a.timings_ms) == list(b.timings_ms)


def test_batch_from_the_engine_profile_and_shared_buffers(trt_bundle: Path, tmp_path: Path) -> None:
    from runtime.backends.tensorrt import TensorRTBackend, _device_memory_size

    # The manifest claims batch 1; the engines were built for 1..2: the engines win.
    bundle = Path(shutil.copytree(trt_bundle, tmp_path / "b"))
    m = load_manifest(bundle)
    write_manifest(bundle, m.model_copy(update={"input": m.input.model_copy(update={"max_batch": 1})}))
    m = load_manifest(bundle)
    x = np.random.default_rng(1).standard_normal((MAX_BATCH, 3, 64, 64)).astype(np.float32)
    with TensorRTBackend(bundle, m, BackendConfig(kind="tensorrt")) as be:
        assert be.max_batch == MAX_BATCH
        out, timings = be.run({"image": x})
        one, _ = be.run({"image": x[:1]})
        # teacher's f1 buffer is score's f1 input: one allocation per tensor name
        assert len(be._device) == len(be._layout)
        # one activation buffer, as large as the hungriest engine's need
        assert be.scratch_bytes == max(256, *(_device_memory_size(p.engine) for p in be._parts))
        with pytest.raises(ValueError, match="must be"):
            be.run({"image": x[:, :, :32]})
        with pytest.raises(ValueError, match="must be"):
            be.run({"image": np.concatenate([x, x])})
    assert out["anomaly_map"].shape == (MAX_BATCH, 1, 64, 64) and out["score"].shape == (MAX_BATCH,)
    np.testing.assert_allclose(one["score"], out["score"][:1], rtol=1e-5, atol=1e-6)
    assert list(timings) == ["teacher", "projection", "ocbe", "decoder", "score"]
    assert all(v > 0 for v in timings.values())


def test_cuda_graph_is_captured_and_gives_the_same_scores(trt_bundle: Path) -> None:
    from runtime.backends.tensorrt import TensorRTBackend

    m = load_manifest(trt_bundle)
    x = np.random.default_rng(2).standard_normal((MAX_BATCH, 3, 64, 64)).astype(np.float32)
    with (
        TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt", cuda_graph=True)) as graph_be,
        TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt")) as plain,
    ):
        first, t_first = graph_be.run({"image": x[:1]})  # plain run, then capture
        assert graph_be.graph_captured, "cuda-python is installed: the chain must be captured"
        assert "teacher" in t_first
        previous = 1
        for batch in (1, 1, MAX_BATCH, MAX_BATCH, 1, 1):  # a batch change runs plainly once and re-captures
            got, t = graph_be.run({"image": x[:batch]})
            want, _ = plain.run({"image": x[:batch]})
            if batch == previous:
                assert list(t) == ["cuda_graph"], f"the graph was not replayed at batch {batch}: {t}"
            else:
                assert "teacher" in t
            previous = batch
            np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got["anomaly_map"], want["anomaly_map"], rtol=1e-6, atol=1e-7)
            assert graph_be.graph_captured
        np.testing.assert_allclose(first["score"], want["score"][:1], rtol=1e-6, atol=1e-7)
        assert t["cuda_graph"] > 0


def test_a_second_backend_outlives_the_first(trt_bundle: Path) -> None:
    # bundle reload / hot swap: the first backend is freed while the second runs (one process-wide trt.Logger)
    from runtime.backends import tensorrt as trt_backend

    m = load_manifest(trt_bundle)
    x = np.zeros((1, 3, 64, 64), np.float32)
    first = trt_backend.TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt"))
    second = trt_backend.TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt", cuda_graph=True))
    want, _ = first.run({"image": x})
    first.close()
    first.close()  # idempotent
    del first
    for _ in range(3):
        got, _ = second.run({"image": x})
    second.close()
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6)
    with pytest.raises(RdedgeError, match="closed"):
        second.run({"image": x})


def test_open_close_does_not_leak_device_memory(trt_bundle: Path) -> None:
    from runtime.backends import cuda_rt
    from runtime.backends.tensorrt import TensorRTBackend

    rt = cuda_rt.cudart()
    m = load_manifest(trt_bundle)
    x = np.zeros((1, 3, 64, 64), np.float32)

    def cycle() -> None:
        with TensorRTBackend(trt_bundle, m, BackendConfig(kind="tensorrt", cuda_graph=True)) as be:
            be.run({"image": x})
            be.run({"image": x})

    cycle()  # first one pays CUDA / TensorRT one-time allocations
    free0, _ = cuda_rt.check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    for _ in range(5):
        cycle()
    free1, _ = cuda_rt.check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    assert free0 - free1 < 8 * 2**20, f"{(free0 - free1) / 2**20:.1f} MiB not returned after 5 open/close cycles"


def test_engine_from_another_tensorrt_or_gpu_is_refused(trt_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(trt_bundle, tmp_path / "b"))
    m = load_manifest(bundle)
    for change, message in (
        ({"tensorrt_version": "8.6.1"}, r"installed is .*rebuild with `rdedge build-engines"),
        ({"sm_count": 1}, "with 1 SMs, this device has"),
        ({"compute_capability": None}, "recorded without the GPU's compute capability"),
    ):
        engines = [e.model_copy(update=change) for e in m.engines]
        write_manifest(bundle, m.model_copy(update={"engines": engines}))
        with pytest.raises(BundleError, match=message):
            AnomalyModel(bundle, BackendConfig(kind="tensorrt"))


def test_gpu_id_out_of_range_is_a_clear_error(trt_bundle: Path) -> None:
    from runtime.backends import cuda_rt

    with pytest.raises(RdedgeError, match="CUDA device"):
        AnomalyModel(trt_bundle, BackendConfig(kind="tensorrt", gpu_id=cuda_rt.device_count()))
