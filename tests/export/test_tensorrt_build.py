"""Pure parts of the TensorRT builder: the precision decision and engine naming (no TensorRT needed)."""

from __future__ import annotations

import pytest

from export.errors import ExportError
from export.tensorrt_build import decide_precision, engine_filename, parse_version, timing_cache_filename
from runtime.backends.tensorrt import check_engine_compat
from runtime.bundle import EngineSpec, load_manifest
from runtime.errors import BundleError

SHA = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("version", "part", "precision", "strong", "flag", "onnx", "engine"),
    [
        ("10.3.0.30", "teacher", "fp16", False, True, "fp32", "fp16"),  # JetPack 6: weakly typed + FP16 flag
        ("10.3.0.30", "score", "fp16", False, False, "fp32", "fp32"),  # score always FP32
        ("10.3.0.30", "decoder", "fp32", False, False, "fp32", "fp32"),
        ("10.11.0", "ocbe", "fp16", False, True, "fp32", "fp16"),
        ("10.12.0.36", "teacher", "fp16", True, False, "fp16", "fp16"),  # strongly typed from the FP16 ONNX
        ("10.13.2", "score", "fp16", True, False, "fp32", "fp32"),
        ("11.0.0", "projection", "fp16", True, False, "fp16", "fp16"),
        ("11.0.0", "decoder", "fp32", True, False, "fp32", "fp32"),
    ],
)
def test_decide_precision(
    version: str, part: str, precision: str, strong: bool, flag: bool, onnx: str, engine: str
) -> None:
    plan = decide_precision(version, part, precision)  # type: ignore[arg-type]
    assert (plan.strongly_typed, plan.fp16_flag, plan.onnx_variant, plan.engine_precision) == (
        strong,
        flag,
        onnx,
        engine,
    )
    assert plan.constrain_fp32_layers == (flag and not strong)
    assert not (plan.strongly_typed and plan.fp16_flag)  # TensorRT rejects the FP16 flag on strongly typed nets


def test_decide_precision_rejects_old_tensorrt_and_bad_values() -> None:
    with pytest.raises(ExportError, match=">= 10.0"):
        decide_precision("8.6.1", "teacher", "fp16")
    with pytest.raises(ExportError, match="precision"):
        decide_precision("10.3", "teacher", "int8")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="cannot parse"):
        parse_version("ten")


def test_engine_names_are_keyed_by_version_gpu_and_onnx_hash() -> None:
    base = engine_filename("teacher", "fp16", "10.3.0.30", "Orin", SHA)
    assert base == "engines/teacher.fp16.trt10.3.0.30.orin.0123456789abcdef.engine"
    variants = {
        engine_filename("teacher", "fp16", "10.13.0", "Orin", SHA),
        engine_filename("teacher", "fp16", "10.3.0.30", "NVIDIA H100 80GB HBM3", SHA),
        engine_filename("teacher", "fp16", "10.3.0.30", "Orin", "f" * 64),
        engine_filename("teacher", "fp32", "10.3.0.30", "Orin", SHA),
        engine_filename("decoder", "fp16", "10.3.0.30", "Orin", SHA),
    }
    assert base not in variants and len(variants) == 5
    assert "/" not in engine_filename("x", "fp16", "10.3", "a/b c", SHA).removeprefix("engines/")
    assert timing_cache_filename("10.3.0.30", "Orin") == "engines/timing.trt10.3.0.30.orin.cache"
    with pytest.raises(ExportError):
        engine_filename("teacher", "fp16", "10.3", "Orin", "not-a-hash")


def test_engine_spec_passes_the_runtime_check_only_on_its_own_device(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    m = load_manifest(exported_bundle)
    sha = m.files["teacher.onnx"]
    spec = EngineSpec(
        part="teacher", file=engine_filename("teacher", "fp16", "10.3.0.30", "Orin", sha), precision="fp16",
        tensorrt_version="10.3.0.30", gpu_name="Orin", onnx_sha256=sha, max_batch=4,
    )  # fmt: skip
    check_engine_compat(spec, m, "10.3.0.30", "Orin")
    with pytest.raises(BundleError, match="TensorRT 10.3.0.30, installed is 10.13"):
        check_engine_compat(spec, m, "10.13.0", "Orin")
    with pytest.raises(BundleError, match="built for GPU"):
        check_engine_compat(spec, m, "10.3.0.30", "NVIDIA H100")


@pytest.mark.parametrize("version", ["10.3.0", "10.13.0"])
def test_density_part_is_always_fp32(version: str) -> None:
    plan = decide_precision(version, "density", "fp16")
    assert plan.engine_precision == "fp32" and plan.onnx_variant == "fp32" and not plan.fp16_flag
