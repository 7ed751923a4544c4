"""Pure parts of the TensorRT builder: precision plan, profile shapes, FP32 pinning rule, engine naming.

No TensorRT needed: every decision the builder makes is a function over plain data, tested here; the GPU tests
(``test_tensorrt_gpu.py``) check that TensorRT is handed these decisions.
"""

from __future__ import annotations

import pytest

from export.errors import ExportError
from export.tensorrt_build import (
    LayerFacts,
    decide_precision,
    engine_filename,
    parse_version,
    pin_to_fp32,
    profile_shapes,
    timing_cache_filename,
)
from runtime.backends.cuda_rt import GpuIdentity
from runtime.backends.tensorrt import check_engine_compat
from runtime.bundle import EngineSpec, load_manifest
from runtime.errors import BundleError

SHA = "0123456789abcdef" * 4
ORIN_NANO = GpuIdentity("Orin", (8, 7), 8)


@pytest.mark.parametrize(
    ("version", "part", "precision", "strong", "flag", "onnx", "engine"),
    [
        ("10.3.0.30", "teacher", "fp16", False, True, "fp32", "fp16"),  # JetPack 6: weakly typed + FP16 flag
        ("10.3.0.30", "score", "fp16", False, False, "fp32", "fp32"),  # score always FP32
        ("10.3.0.30", "fused", "fp16", False, False, "fp32", "fp32"),  # the fused graph holds the score
        ("10.3.0.30", "decoder", "fp32", False, False, "fp32", "fp32"),
        ("10.11.0", "ocbe", "fp16", False, True, "fp32", "fp16"),
        ("10.12.0.36", "teacher", "fp16", True, False, "fp16", "fp16"),  # strongly typed from the FP16 ONNX
        ("10.13.2", "score", "fp16", True, False, "fp32", "fp32"),
        ("10.13.2", "fused", "fp16", True, False, "fp32", "fp32"),
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
    # TF32 (on by default in TensorRT) is cleared for every FP32 engine, the score part included
    assert plan.tf32 == (engine == "fp16")


def test_decide_precision_rejects_old_tensorrt_and_bad_values() -> None:
    with pytest.raises(ExportError, match=">= 10.0"):
        decide_precision("8.6.1", "teacher", "fp16")
    with pytest.raises(ExportError, match="precision"):
        decide_precision("10.3", "teacher", "int8")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="cannot parse"):
        parse_version("ten")


def test_profile_is_tuned_for_batch_one() -> None:
    assert profile_shapes((3, 256, 256), 8) == ((1, 3, 256, 256), (1, 3, 256, 256), (8, 3, 256, 256))
    assert profile_shapes((), 1) == ((1,), (1,), (1,))  # the score output's (B,) shape style
    with pytest.raises(ExportError, match="max-batch"):
        profile_shapes((3, 64, 64), 0)
    with pytest.raises(ExportError, match="dynamic axis besides the batch"):
        profile_shapes((3, -1, 64), 2)


def _layer(
    type_: str, op: str | None = None, ins: tuple[str, ...] = ("FLOAT",), outs: tuple[str, ...] = ("FLOAT",)
) -> LayerFacts:
    return LayerFacts(type_, op, ins, outs, tuple(True for _ in outs))


@pytest.mark.parametrize(
    ("layer", "pinned"),
    [
        (_layer("REDUCE"), True),
        (_layer("NORMALIZATION"), True),
        (_layer("SOFTMAX"), True),
        (_layer("UNARY", "SQRT"), True),
        (_layer("UNARY", "EXP"), True),
        (_layer("UNARY", "ABS"), False),
        (_layer("ELEMENTWISE", "DIV", ins=("FLOAT", "FLOAT")), True),
        (_layer("ELEMENTWISE", "POW", ins=("FLOAT", "FLOAT")), True),
        (_layer("ELEMENTWISE", "SUM", ins=("FLOAT", "FLOAT")), False),
        (_layer("CONVOLUTION"), False),
        # shape arithmetic (H / 8 on INT64 shape values), integer reductions, bool masks: never touched
        (_layer("ELEMENTWISE", "DIV", ins=("INT64", "INT64"), outs=("INT64",)), False),
        (_layer("ELEMENTWISE", "DIV", ins=("INT32", "INT32"), outs=("INT32",)), False),
        (_layer("REDUCE", ins=("INT32",), outs=("INT32",)), False),
        (_layer("ELEMENTWISE", "POW", ins=("FLOAT", "FLOAT"), outs=("BOOL",)), False),
        (_layer("SHAPE", ins=("FLOAT",), outs=("INT64",)), False),
        (_layer("CONSTANT", ins=(), outs=("FLOAT",)), False),
        (_layer("CAST", ins=("FLOAT",), outs=("FLOAT",)), False),
        (LayerFacts("REDUCE", None, ("FLOAT",), ("FLOAT",), (False,)), False),  # a shape tensor output
        (LayerFacts("REDUCE", None, ("FLOAT",), (), ()), False),
    ],
)
def test_fp32_pinning_touches_only_float_activation_layers(layer: LayerFacts, pinned: bool) -> None:
    assert pin_to_fp32(layer) is pinned


def test_engine_names_are_keyed_by_version_gpu_and_onnx_hash() -> None:
    base = engine_filename("teacher", "fp16", "10.3.0.30", ORIN_NANO, SHA)
    assert base == "engines/teacher.fp16.trt10.3.0.30.orin.sm87.8sm.0123456789abcdef.engine"
    variants = {
        engine_filename("teacher", "fp16", "10.13.0", ORIN_NANO, SHA),
        engine_filename("teacher", "fp16", "10.3.0.30", GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0), 132), SHA),
        engine_filename("teacher", "fp16", "10.3.0.30", GpuIdentity("Orin", (8, 7), 16), SHA),  # AGX Orin 64 GB
        engine_filename("teacher", "fp16", "10.3.0.30", GpuIdentity("Orin", (8, 7), 4), SHA),  # Orin Nano 4 GB
        engine_filename("teacher", "fp16", "10.3.0.30", ORIN_NANO, "f" * 64),
        engine_filename("teacher", "fp32", "10.3.0.30", ORIN_NANO, SHA),
        engine_filename("decoder", "fp16", "10.3.0.30", ORIN_NANO, SHA),
    }
    assert base not in variants and len(variants) == 7
    odd = GpuIdentity("a/b c", (8, 6), 2)
    assert "/" not in engine_filename("x", "fp16", "10.3", odd, SHA).removeprefix("engines/")
    assert timing_cache_filename("10.3.0.30", ORIN_NANO) == "engines/timing.trt10.3.0.30.orin.sm87.8sm.cache"
    assert timing_cache_filename("10.3.0.30", ORIN_NANO) != timing_cache_filename("10.3.0.30", odd)
    with pytest.raises(ExportError):
        engine_filename("teacher", "fp16", "10.3", ORIN_NANO, "not-a-hash")


def test_engine_spec_passes_the_runtime_check_only_on_its_own_device(exported_bundle) -> None:  # type: ignore[no-untyped-def]
    m = load_manifest(exported_bundle)
    sha = m.files["teacher.onnx"]
    spec = EngineSpec(
        part="teacher", file=engine_filename("teacher", "fp16", "10.3.0.30", ORIN_NANO, sha), precision="fp16",
        tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7", sm_count=8, onnx_sha256=sha,
        max_batch=4,
    )  # fmt: skip
    check_engine_compat(spec, m, "10.3.0.30", ORIN_NANO)
    with pytest.raises(BundleError, match="TensorRT 10.3.0.30, installed is 10.13"):
        check_engine_compat(spec, m, "10.13.0", ORIN_NANO)
    with pytest.raises(BundleError, match="built for GPU"):
        check_engine_compat(spec, m, "10.3.0.30", GpuIdentity("NVIDIA H100", (9, 0), 132))
    with pytest.raises(BundleError, match="with 8 SMs, this device has 8.7 with 16"):
        check_engine_compat(spec, m, "10.3.0.30", GpuIdentity("Orin", (8, 7), 16))


@pytest.mark.parametrize("version", ["10.3.0", "10.13.0"])
def test_density_part_is_always_fp32(version: str) -> None:
    plan = decide_precision(version, "density", "fp16")
    assert plan.engine_precision == "fp32" and plan.onnx_variant == "fp32" and not plan.fp16_flag and not plan.tf32
