"""Backends on the real tiny bundle: ORT chain vs fused, the score graph on hand-computed cases, clear errors,
and the TensorRT engine compatibility rules (pure function, no GPU needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.base import create_backend
from runtime.backends.cuda_rt import GpuIdentity
from runtime.backends.onnxruntime import import_onnxruntime
from runtime.backends.tensorrt import check_engine_compat, select_engines
from runtime.bundle import EngineSpec, Manifest, load_manifest, sha256_file, write_manifest
from runtime.config import BackendConfig
from runtime.errors import BundleError, MissingExtraError, RdedgeError
from tests.helpers.onnx_bundle import tensor_shapes

SHAPES = tensor_shapes(64)


def _images(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_and_fused_agree(tiny_bundle: Path, seed: int) -> None:
    m = load_manifest(tiny_bundle)
    x = {"image": _images(seed, batch=2)}
    with (
        create_backend(tiny_bundle, m, BackendConfig(threads=1)) as chain,
        create_backend(tiny_bundle, m, BackendConfig(fused=True, threads=1)) as fused,
    ):
        out_c, t_c = chain.run(x)
        out_f, t_f = fused.run(x)
    assert out_c["anomaly_map"].shape == (2, 1, 64, 64) and out_c["anomaly_map"].dtype == np.float32
    assert out_c["score"].shape == (2,) and out_c["score"].dtype == np.float32
    np.testing.assert_allclose(out_c["score"], out_f["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_c["anomaly_map"], out_f["anomaly_map"], rtol=1e-5, atol=1e-5)
    assert list(t_c) == ["teacher", "projection", "ocbe", "decoder", "score"]
    assert list(t_f) == ["fused"]
    assert all(v >= 0 for v in [*t_c.values(), *t_f.values()])


def _score_session(bundle: Path):  # type: ignore[no-untyped-def]
    ort = import_onnxruntime()
    return ort.InferenceSession(str(bundle / "score.onnx"), providers=["CPUExecutionProvider"])


def _features(fill: dict[int, float], batch: int = 1) -> dict[str, np.ndarray]:
    """Per-scale tensors that are zero except channel ``c`` set to ``v`` for each ``c, v`` in ``fill``."""
    out = {}
    for i in (1, 2, 3):
        t = np.zeros([batch, *SHAPES[f"f{i}"][1:]], np.float32)
        for c, v in fill.items():
            t[:, c] = v
        out[str(i)] = t
    return out


def test_score_identical_features_give_zero(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(3)
    f = {f"f{i}": rng.standard_normal([2, *SHAPES[f"f{i}"][1:]]).astype(np.float32) for i in (1, 2, 3)}
    feed = {**f, **{f"d{i}": f[f"f{i}"] * 3.0 for i in (1, 2, 3)}}  # same direction, other length
    amap, score = _score_session(tiny_bundle).run(["anomaly_map", "score"], feed)
    assert amap.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(amap, 0.0, atol=1e-5)
    np.testing.assert_allclose(score, 0.0, atol=1e-5)


@pytest.mark.parametrize(("d_fill", "per_scale"), [({1: 1.0}, 1.0), ({0: -2.0}, 2.0)])
def test_score_orthogonal_and_opposite_features(tiny_bundle: Path, d_fill: dict[int, float], per_scale: float) -> None:
    # f = e0 everywhere. d = e1 (orthogonal: 1 - 0 = 1 per scale) or -2*e0 (opposite: 1 - (-1) = 2 per scale).
    # Three scales sum to 3x; the normalised Gaussian blur of a constant (reflect padding) keeps it constant.
    f, d = _features({0: 1.0}), _features(d_fill)
    feed = {**{f"f{i}": f[i] for i in "123"}, **{f"d{i}": d[i] for i in "123"}}
    amap, score = _score_session(tiny_bundle).run(["anomaly_map", "score"], feed)
    np.testing.assert_allclose(amap, 3 * per_scale, atol=1e-4)
    np.testing.assert_allclose(score, [3 * per_scale], atol=1e-4)


def test_score_localised_defect_peaks_at_the_defect(tiny_bundle: Path) -> None:
    f = _features({0: 1.0})
    d = {k: v.copy() for k, v in f.items()}
    d["3"][0, :, 1, 2] = 0.0
    d["3"][0, 1, 1, 2] = 1.0  # one coarse cell (16x16 pixels at rows 16..31, cols 32..47) orthogonal
    feed = {**{f"f{i}": f[i] for i in "123"}, **{f"d{i}": d[i] for i in "123"}}
    amap, score = _score_session(tiny_bundle).run(["anomaly_map", "score"], feed)
    y, x = np.unravel_index(np.argmax(amap[0, 0]), (64, 64))
    assert 16 <= y < 32 and 32 <= x < 48
    assert 0 < score[0] < 1.0 and score[0] == pytest.approx(amap.max())


def _spinning(backend) -> list[str]:  # type: ignore[no-untyped-def]
    key = "session.intra_op.allow_spinning"
    return [s.get_session_options().get_session_config_entry(key) for _, s in backend._parts]


def test_spinning_is_off_unless_asked_and_scores_the_same(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = load_manifest(tiny_bundle)
    x = {"image": _images(3)}
    with (
        create_backend(tiny_bundle, m, BackendConfig(fused=True, threads=2)) as calm,
        create_backend(tiny_bundle, m, BackendConfig(fused=True, threads=2, spinning=True)) as spin,
    ):
        assert _spinning(calm) == ["0"] and _spinning(spin) == ["1"]
        np.testing.assert_array_equal(calm.run(x)[0]["score"], spin.run(x)[0]["score"])
    assert "chained sessions" not in caplog.text
    with create_backend(tiny_bundle, m, BackendConfig(threads=1, spinning=True)) as chain:
        assert _spinning(chain) == ["1"] * 5
    assert "backend.spinning with 5 chained sessions" in caplog.text


def test_fused_requested_without_fused_graph(tmp_path: Path) -> None:
    from tests.helpers.onnx_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b", fused=False, threshold=1.0)
    with pytest.raises(BundleError, match="no fused model.onnx"):
        create_backend(bundle, load_manifest(bundle), BackendConfig(fused=True))


def test_cuda_without_cuda_provider_is_a_clear_error(tiny_bundle: Path) -> None:
    ort = import_onnxruntime()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RdedgeError, match="onnxruntime-gpu"):
        create_backend(tiny_bundle, load_manifest(tiny_bundle), BackendConfig(device="cuda"))


def test_tensorrt_missing_names_the_extra(tiny_bundle: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    with pytest.raises(MissingExtraError, match=r"rdedge\[trt\]"):
        create_backend(tiny_bundle, load_manifest(tiny_bundle), BackendConfig(kind="tensorrt"))


def test_onnxruntime_missing_names_the_extra(tiny_bundle: Path) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from runtime.engine import AnomalyModel\n"
        "from runtime.config import BackendConfig\n"
        "from runtime.errors import MissingExtraError\n"
        "try:\n"
        f"    AnomalyModel({str(tiny_bundle)!r}, BackendConfig())\n"
        "except MissingExtraError as e:\n"
        "    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "onnxruntime is not installed" in res.stdout and "rdedge[cpu]" in res.stdout


def test_corrupt_part_is_a_bundle_error(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / "ocbe.onnx").write_bytes(b"not an onnx file")
    m = load_manifest(bundle, verify=False)
    with pytest.raises(BundleError, match="ocbe.onnx: onnxruntime cannot load part 'ocbe'"):
        create_backend(bundle, m, BackendConfig())


# ---------------------------------------------------------------------------------- TensorRT engine compatibility
TRT, GPU = "10.3.0", GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0), 132)


def _engine(m: Manifest, part: str = "teacher", **kw: str | int | None) -> EngineSpec:
    spec: dict[str, str | int | None] = {
        "part": part,
        "file": f"engines/{part}.engine",
        "precision": "fp16",
        "tensorrt_version": TRT,
        "gpu_name": GPU.name,
        "compute_capability": GPU.cc,
        "sm_count": GPU.sm_count,
        "onnx_sha256": m.files[f"{part}.onnx" if part != "fused" else "model.onnx"],
    }
    spec.update(kw)
    return EngineSpec.model_validate(spec)


def test_engine_compat_accepts_a_matching_engine(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    check_engine_compat(_engine(m), m, TRT, GPU)
    check_engine_compat(_engine(m, "fused"), m, TRT, GPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tensorrt_version": "10.0.1"}, "built with TensorRT 10.0.1, installed is 10.3.0"),
        ({"gpu_name": "Orin"}, "built for GPU 'Orin', this device is 'NVIDIA H100 80GB HBM3'"),
        ({"onnx_sha256": "ab" * 32}, "built from an ONNX with sha256 abababababab..., but teacher.onnx"),
        # Orin AGX / NX / Nano all call themselves "Orin": the SM count tells them apart
        ({"sm_count": 16}, "built for compute capability 9.0 with 16 SMs, this device has 9.0 with 132"),
        ({"compute_capability": "8.7"}, "built for compute capability 8.7 with 132 SMs"),
        ({"compute_capability": None}, "recorded without the GPU's compute capability and SM count"),
    ],
)
def test_engine_compat_refuses_mismatches(tiny_bundle: Path, change: dict[str, str | int | None], message: str) -> None:
    m = load_manifest(tiny_bundle)
    with pytest.raises(BundleError) as err:
        check_engine_compat(_engine(m, **change), m, TRT, GPU, bundle_dir="/opt/bundle")
    assert message in str(err.value)
    assert "engines/teacher.engine" in str(err.value)
    assert "rebuild with `rdedge build-engines /opt/bundle`" in str(err.value)


def test_engine_compat_lists_every_problem(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    with pytest.raises(BundleError, match="TensorRT 9.9.*GPU 'X'.*sha256.*rdedge build-engines BUNDLE"):
        check_engine_compat(_engine(m, tensorrt_version="9.9", gpu_name="X", onnx_sha256="0" * 64), m, TRT, GPU)


def test_engine_of_re_exported_part_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    # Engines built, then the ONNX re-exported: manifest hash and engine's onnx_sha256 no longer agree.
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    m = load_manifest(bundle)
    eng = _engine(m, "decoder")
    (bundle / "decoder.onnx").write_bytes((bundle / "decoder.onnx").read_bytes() + b"\0")
    (bundle / "engines").mkdir()
    (bundle / "engines/decoder.engine").write_bytes(b"x")
    files = {**m.files, "decoder.onnx": sha256_file(bundle / "decoder.onnx"), eng.file: sha256_file(bundle / eng.file)}
    m2 = m.model_copy(update={"files": files, "engines": [eng]})
    write_manifest(bundle, m2)
    with pytest.raises(BundleError, match="decoder.onnx in this bundle has"):
        check_engine_compat(eng, load_manifest(bundle), TRT, GPU)


def test_select_engines_picks_the_compatible_one_and_names_missing_parts(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    other = _engine(m, gpu_name="Orin", file="engines/teacher.orin.engine")
    good = _engine(m)
    m2 = m.model_copy(update={"engines": [other, good]})
    assert select_engines(m2, ["teacher"], TRT, GPU)["teacher"] == good
    with pytest.raises(BundleError, match="Orin"):
        select_engines(m2.model_copy(update={"engines": [other]}), ["teacher"], TRT, GPU)
    with pytest.raises(BundleError, match="no TensorRT engine for part 'score'"):
        select_engines(m2, ["teacher", "score"], TRT, GPU)
