"""TensorRT engines for a bundle, built on the device that will run them (``rdedge build-engines BUNDLE_DIR``).

* Precision is decided in one place, :func:`decide_precision`, from the TensorRT version:

  - TensorRT 10.0 .. 10.11 (JetPack 6 ships 10.3): *weakly typed* network from the FP32 ONNX with
    ``BuilderFlag.FP16``; layers that compute norms, reductions, divisions, powers and exp/log are pinned to FP32
    (``PREFER_PRECISION_CONSTRAINTS``), but only layers whose tensors are float activations: shape, integer and
    bool layers are left alone, as Polygraphy's ``debug precision`` does (:func:`pin_to_fp32`).
  - TensorRT >= 10.12 (and 11, where weak typing is gone): *strongly typed* network (``STRONGLY_TYPED``), whose
    precision is exactly the ONNX types, built from the bundle's ``<part>.fp16.onnx`` (:mod:`export.fp16`: FP16
    weights and activations, normalisations/reductions/cosine FP32, FP32 I/O).
  - ``score``, ``density`` and the fused graph (which holds the score) are always FP32.
  - FP32 engines are built with ``BuilderFlag.TF32`` cleared: TensorRT sets it by default, and TF32 convolutions
    and matmuls round to 10 mantissa bits (~1e-3 relative), which is not FP32.

* One optimisation profile per engine: batch ``1 .. max_batch``, tuned for batch 1 (opt = 1: a line camera scores
  one frame at a time), other axes fixed (:func:`profile_shapes`).
* Built on CUDA device ``gpu_id`` (``cudaSetDevice`` before the builder exists; TensorRT builds on the current one).
* A timing cache per TensorRT version and GPU (``engines/timing.<trt>.<gpu>.cache``) makes rebuilds fast; a cache
  TensorRT rejects (other device, other version, corrupt) is replaced by a fresh one, never fatal.
* Engine files are keyed by TensorRT version, GPU (name, compute capability, SM count: Orin AGX / NX / Nano share
  the name) and the sha256 of the part's ONNX (:func:`engine_filename`) and recorded in ``manifest.engines``; the
  runtime refuses any engine whose key does not match (``runtime.backends.tensorrt.check_engine_compat``). The
  manifest is rewritten atomically with the engines' hashes.

``tensorrt`` and cuda-python are imported only when engines are built; without them the error names ``rdedge[trt]``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from export.errors import ExportError
from runtime.backends import cuda_rt
from runtime.backends.cuda_rt import GpuIdentity
from runtime.backends.tensorrt import import_tensorrt, trt_logger
from runtime.bundle import EngineSpec, Manifest, load_manifest

__all__ = [
    "LayerFacts",
    "PrecisionPlan",
    "build_engine",
    "build_engines",
    "decide_precision",
    "engine_filename",
    "import_tensorrt",
    "pin_to_fp32",
    "profile_shapes",
    "timing_cache_filename",
]

log = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
#: First TensorRT version built strongly typed (weak typing deprecated in 10.12, removed in 11).
STRONGLY_TYPED_FROM = (10, 12)
MIN_VERSION = (10, 0)  # name-based tensor API (set_tensor_address, execute_async_v3)
#: Distances and squared sums (FP16 would overflow or round); the fused graph contains the score part.
FP32_PARTS = frozenset({"score", "density", "fused"})


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build one part's engine.

    Attributes:
        engine_precision: precision recorded in the manifest (``score`` is always ``fp32``).
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        fp16_flag: set ``BuilderFlag.FP16`` (weakly typed FP16 only).
        constrain_fp32_layers: pin norm/reduction/cosine-like layers to FP32 (weakly typed FP16 only).
        onnx_variant: which ONNX to parse: ``fp32`` (``<part>.onnx``) or ``fp16`` (``<part>.fp16.onnx``).
        tf32: leave ``BuilderFlag.TF32`` on (TensorRT's default); cleared for every FP32 engine.
    """

    engine_precision: Precision
    strongly_typed: bool
    fp16_flag: bool
    constrain_fp32_layers: bool
    onnx_variant: Precision
    tf32: bool


def parse_version(version: str) -> tuple[int, int]:
    """``"10.3.0.30"`` -> ``(10, 3)``; raises ExportError for an unparsable string."""
    m = re.match(r"^\s*(\d+)\.(\d+)", version)
    if not m:
        raise ExportError(f"cannot parse the TensorRT version {version!r}")
    return int(m.group(1)), int(m.group(2))


def decide_precision(trt_version: str, part: str, precision: Precision) -> PrecisionPlan:
    """The one precision decision (see the module docstring).

    Args:
        trt_version: ``tensorrt.__version__``.
        part: part name (``score``, ``density`` and ``fused`` are always FP32).
        precision: requested precision of the FP16-able parts.

    Raises:
        ExportError: TensorRT older than 10.0 or an unknown precision.
    """
    if precision not in ("fp16", "fp32"):
        raise ExportError(f"--precision must be fp16 or fp32, got {precision!r}")
    ver = parse_version(trt_version)
    if ver < MIN_VERSION:
        raise ExportError(f"TensorRT {trt_version} is too old: rdedge needs TensorRT >= 10.0 (JetPack 6 has 10.3)")
    prec: Precision = "fp32" if part in FP32_PARTS else precision
    tf32 = prec == "fp16"  # an FP16 engine's FP32 fallbacks may use TF32; an FP32 engine may not
    if ver >= STRONGLY_TYPED_FROM:
        return PrecisionPlan(prec, True, fp16_flag=False, constrain_fp32_layers=False, onnx_variant=prec, tf32=tf32)
    fp16 = prec == "fp16"
    return PrecisionPlan(prec, False, fp16_flag=fp16, constrain_fp32_layers=fp16, onnx_variant="fp32", tf32=tf32)


def profile_shapes(rest: Sequence[int], max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(min, opt, max)`` shapes of one input: batch 1 .. ``max_batch``, kernels tuned for batch 1.

    >>> profile_shapes((3, 64, 64), 4)
    ((1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64))

    Raises:
        ExportError: ``max_batch`` below 1 or a dynamic axis besides the batch.
    """
    if max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {max_batch}")
    dims = tuple(int(d) for d in rest)
    if any(d < 0 for d in dims):
        raise ExportError(f"input has a dynamic axis besides the batch: (-1, {', '.join(map(str, dims))})")
    return (1, *dims), (1, *dims), (max_batch, *dims)


@dataclass(frozen=True)
class LayerFacts:
    """What :func:`pin_to_fp32` needs to know about one network layer (plain data, read from ``trt.ILayer``).

    Attributes:
        type: ``trt.LayerType`` name (``"REDUCE"``, ``"UNARY"``, ``"SHAPE"``..).
        op: ``UnaryOperation`` / ``ElementWiseOperation`` name for unary and elementwise layers, else ``None``.
        input_dtypes: ``trt.DataType`` names of the connected inputs (``"FLOAT"``, ``"HALF"``, ``"INT32"``..).
        output_dtypes: ``trt.DataType`` names of the outputs.
        outputs_are_execution: ``ITensor.is_execution_tensor`` of each output (False for shape tensors).
    """

    type: str
    op: str | None
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    outputs_are_execution: tuple[bool, ...]


_PIN_TYPES = frozenset({"REDUCE", "NORMALIZATION", "SOFTMAX"})
_PIN_UNARY = frozenset({"EXP", "LOG", "SQRT", "RECIP"})
_PIN_ELEMENTWISE = frozenset({"DIV", "POW"})
_FLOAT = frozenset({"FLOAT", "HALF"})
_NEVER = frozenset({"CONSTANT", "SHAPE", "CAST", "ASSERTION", "IDENTITY"})


def pin_to_fp32(layer: LayerFacts) -> bool:
    """Whether a weakly typed FP16 build pins this layer (precision and output types) to FP32.

    Numerically fragile float ops are pinned: reductions, normalisations, softmax, exp/log/sqrt/reciprocal, division
    and power. As in Polygraphy (``debug precision``'s ``should_exclude``), a layer is never pinned when any output
    is a shape tensor or not a float activation, or (stricter) when an input is not float: shape arithmetic on
    ``INT32``/``INT64`` and ``BOOL`` masks must keep their types, or TensorRT logs errors and ignores the request.
    """
    if layer.type in _NEVER or not layer.output_dtypes:
        return False
    if not all(layer.outputs_are_execution):
        return False
    if any(d not in _FLOAT for d in (*layer.input_dtypes, *layer.output_dtypes)):
        return False
    if layer.type == "UNARY":
        return layer.op in _PIN_UNARY
    if layer.type == "ELEMENTWISE":
        return layer.op in _PIN_ELEMENTWISE
    return layer.type in _PIN_TYPES


def _layer_facts(trt: Any, layer: Any) -> LayerFacts:
    """Read :class:`LayerFacts` from a ``trt.ILayer`` (down-casts unary/elementwise layers to read ``op``)."""
    lt = trt.LayerType
    op = None
    if layer.type == lt.UNARY:
        layer.__class__ = trt.IUnaryLayer
        op = layer.op.name
    elif layer.type == lt.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        op = layer.op.name
    inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
    outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
    return LayerFacts(
        type=layer.type.name,
        op=op,
        input_dtypes=tuple(t.dtype.name for t in inputs if t is not None),
        output_dtypes=tuple(t.dtype.name for t in outputs),
        outputs_are_execution=tuple(bool(t.is_execution_tensor) for t in outputs),
    )


def _pin_fp32_layers(trt: Any, network: Any) -> int:
    """Pin every layer :func:`pin_to_fp32` selects; returns how many."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if pin_to_fp32(_layer_facts(trt, layer)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def engine_filename(part: str, precision: Precision, trt_version: str, gpu: GpuIdentity, onnx_sha256: str) -> str:
    """Bundle-relative engine path keyed by part, precision, TensorRT version, GPU and ONNX sha256.

    >>> engine_filename("teacher", "fp16", "10.3.0.30", GpuIdentity("Orin (nvgpu)", (8, 7), 8), "ab" * 32)
    'engines/teacher.fp16.trt10.3.0.30.orin-nvgpu.sm87.8sm.abababababababab.engine'
    """
    if len(onnx_sha256) < 16 or not re.fullmatch(r"[0-9a-f]+", onnx_sha256):
        raise ExportError(f"not a sha256 hex digest: {onnx_sha256!r}")
    return f"engines/{part}.{precision}.trt{_slug(trt_version)}.{gpu.slug()}.{onnx_sha256[:16]}.engine"


def timing_cache_filename(trt_version: str, gpu: GpuIdentity) -> str:
    """Bundle-relative timing cache path for one TensorRT version and GPU."""
    return f"engines/timing.trt{_slug(trt_version)}.{gpu.slug()}.cache"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def _attach_timing_cache(config: Any, path: Path) -> bool:
    """Give the builder the timing cache at ``path``, or a fresh one if TensorRT rejects it.

    ``set_timing_cache(..., ignore_mismatch=False)`` returns False for a cache from another device or TensorRT,
    and ``create_timing_cache`` may return None for unreadable bytes. Returns whether any cache is attached.
    """
    candidates = [(path.read_bytes(), str(path))] if path.is_file() else []
    for blob, what in [*candidates, (b"", "a fresh cache")]:
        try:
            cache = config.create_timing_cache(blob)
        except Exception as exc:  # noqa: BLE001 - the bindings raise their own types for bad bytes
            log.warning("TensorRT cannot read the timing cache %s (%s)", what, exc)
            continue
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        log.warning("TensorRT rejected the timing cache %s (other device or version?)", what)
    log.warning("building without a timing cache")
    return False


def build_engine(
    trt: Any, onnx_path: Path, engine_path: Path, plan: PrecisionPlan, max_batch: int, timing_cache: Path
) -> float:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path`` (atomically), on the current device.

    Returns:
        Seconds spent in ``build_serialized_network``.

    Raises:
        ExportError: the parser or the builder failed (parser errors are listed).
    """
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: the only kind
    if plan.strongly_typed and strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse the ONNX: {errs}")
    config = builder.create_builder_config()
    if plan.fp16_flag:  # only planned for TensorRT < 10.12, which has the flag
        config.set_flag(trt.BuilderFlag.FP16)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not plan.tf32:
        config.clear_flag(tf32)
    if plan.constrain_fp32_layers:
        n = _pin_fp32_layers(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("%s: %d layer(s) pinned to FP32", onnx_path.name, n)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        try:
            lo, opt, hi = profile_shapes(tuple(t.shape)[1:], max_batch)
        except ExportError as exc:
            raise ExportError(f"{onnx_path}: input {t.name}: {exc}") from None
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    have_cache = _attach_timing_cache(config, timing_cache)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    _write_atomic(engine_path, memoryview(serialized))
    cache = config.get_timing_cache() if have_cache else None
    if cache is not None:
        _write_atomic(timing_cache, memoryview(cache.serialize()))
    return seconds


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_engines(
    bundle_dir: Path, precision: Precision = "fp16", max_batch: int | None = None, gpu_id: int = 0
) -> Manifest:
    """Build engines for the chain parts (and the fused graph, if the bundle has one) and record them.

    Engines already recorded for the same TensorRT version and GPU are replaced; engines for other devices stay.

    Args:
        bundle_dir: an exported bundle (verified before building).
        precision: precision of teacher/projection/ocbe/decoder (score, density and fused are FP32).
        max_batch: top of the optimisation profile; default ``manifest.input.max_batch`` (written back to it).
        gpu_id: CUDA device ordinal to build on (and to name the engines after).

    Returns:
        The rewritten, re-validated manifest.
    """
    from export.bundle_writer import finalize_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    if manifest.int8 is not None:
        raise ExportError(
            f"{bundle_dir}: an int8 bundle (parts {manifest.int8.parts} are ONNX Runtime QDQ graphs for the CPU); "
            "build engines from the fp16 or fp32 export of the same run"
        )
    trt = import_tensorrt()
    gpu = cuda_rt.device_identity(gpu_id)
    cuda_rt.set_device(gpu_id)
    version = str(trt.__version__)
    batch = int(max_batch or manifest.input.max_batch)
    if batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {batch}")
    cache = bundle_dir / timing_cache_filename(version, gpu)
    specs = [*manifest.parts, *([manifest.fused] if manifest.fused is not None else [])]
    new: list[EngineSpec] = []
    for spec in specs:
        part = spec.name
        plan = decide_precision(version, part, precision)
        onnx_file = spec.file
        if plan.onnx_variant == "fp16":
            fp16_file = manifest.extra.get(f"fp16_onnx.{part}")
            if not isinstance(fp16_file, str) or fp16_file not in manifest.files:
                raise ExportError(
                    f"TensorRT {version} builds strongly typed FP16 engines from <part>.fp16.onnx, but bundle "
                    f"{bundle_dir} has none for {part!r}; re-export with --precision fp16 or build with "
                    "--precision fp32"
                )
            onnx_file = fp16_file
        sha = manifest.files[spec.file]
        rel = engine_filename(part, plan.engine_precision, version, gpu, sha)
        log.info("building %s engine for %s (%s, TensorRT %s, %s, %s)", plan.engine_precision, part, onnx_file,
                 version, "strongly typed" if plan.strongly_typed else "weakly typed", gpu)  # fmt: skip
        seconds = build_engine(trt, bundle_dir / onnx_file, bundle_dir / rel, plan, batch, cache)
        log.info("built %s in %.1f s", rel, seconds)
        new.append(
            EngineSpec(
                part=part,
                file=rel,
                precision=plan.engine_precision,
                tensorrt_version=version,
                gpu_name=gpu.name,
                compute_capability=gpu.cc,
                sm_count=gpu.sm_count,
                onnx_sha256=sha,
                max_batch=batch,
            )
        )

    def same_device(e: EngineSpec) -> bool:  # an engine recorded without cc/SMs (older rdedge) counts as this one's
        key = (e.compute_capability, e.sm_count)
        return (e.tensorrt_version, e.gpu_name) == (version, gpu.name) and key in ((gpu.cc, gpu.sm_count), (None, None))

    kept = [e for e in manifest.engines if not same_device(e)]
    new_files = {e.file for e in new}
    for old in manifest.engines:
        if old not in kept and old.file not in new_files:
            (bundle_dir / old.file).unlink(missing_ok=True)
    updated = manifest.model_copy(
        update={
            "engines": [*kept, *new],
            "input": manifest.input.model_copy(update={"max_batch": batch}),
            "versions": {**manifest.versions, "tensorrt": version},
        }
    )
    return finalize_manifest(bundle_dir, updated)
