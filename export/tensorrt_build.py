"""TensorRT engines for a bundle, built on the device that will run them (``rdedge build-engines BUNDLE_DIR``).

* Precision is decided in one place, :func:`decide_precision`, from the TensorRT version:

  - TensorRT 10.0 .. 10.11 (JetPack 6 ships 10.3): *weakly typed* network from the FP32 ONNX with
    ``BuilderFlag.FP16``; layers that compute norms, reductions, divisions, powers and exp/log are pinned to FP32
    (``PREFER_PRECISION_CONSTRAINTS``).
  - TensorRT >= 10.12 (and 11, where weak typing is gone): *strongly typed* network (``STRONGLY_TYPED``), whose
    precision is exactly the ONNX types, built from the bundle's ``<part>.fp16.onnx`` (:mod:`export.fp16`: FP16
    weights and activations, normalisations/reductions/cosine FP32, FP32 I/O).
  - The ``score`` part is always FP32.

* One optimisation profile per engine: batch ``1 .. max_batch`` (opt = max_batch), other axes fixed.
* A timing cache per TensorRT version and GPU (``engines/timing.<trt>.<gpu>.cache``) makes rebuilds fast.
* Engine files are keyed by TensorRT version, GPU name and the sha256 of the part's ONNX (:func:`engine_filename`)
  and recorded in ``manifest.engines``; the runtime refuses any engine whose key does not match
  (``runtime.backends.tensorrt.check_engine_compat``). The manifest is rewritten atomically with the engines' hashes.

``tensorrt`` (and ``pycuda`` for the GPU name) are imported only when engines are built; without them the error
names ``rdedge[trt]``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from export.errors import ExportError, MissingExtraError
from runtime.bundle import EngineSpec, Manifest, load_manifest

log = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
#: First TensorRT version built strongly typed (weak typing deprecated in 10.12, removed in 11).
STRONGLY_TYPED_FROM = (10, 12)
MIN_VERSION = (10, 0)  # name-based tensor API (set_tensor_address, execute_async_v3)
FP32_PARTS = frozenset({"score", "density"})  # distances and squared sums: FP16 would overflow or round


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build one part's engine.

    Attributes:
        engine_precision: precision recorded in the manifest (``score`` is always ``fp32``).
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        fp16_flag: set ``BuilderFlag.FP16`` (weakly typed FP16 only).
        constrain_fp32_layers: pin norm/reduction/cosine-like layers to FP32 (weakly typed FP16 only).
        onnx_variant: which ONNX to parse: ``fp32`` (``<part>.onnx``) or ``fp16`` (``<part>.fp16.onnx``).
    """

    engine_precision: Precision
    strongly_typed: bool
    fp16_flag: bool
    constrain_fp32_layers: bool
    onnx_variant: Precision


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
        part: part name (``score`` is always FP32).
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
    if ver >= STRONGLY_TYPED_FROM:
        return PrecisionPlan(prec, strongly_typed=True, fp16_flag=False, constrain_fp32_layers=False, onnx_variant=prec)
    fp16 = prec == "fp16"
    return PrecisionPlan(prec, strongly_typed=False, fp16_flag=fp16, constrain_fp32_layers=fp16, onnx_variant="fp32")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"


def engine_filename(part: str, precision: Precision, trt_version: str, gpu_name: str, onnx_sha256: str) -> str:
    """Bundle-relative engine path keyed by part, precision, TensorRT version, GPU name and ONNX sha256.

    >>> engine_filename("teacher", "fp16", "10.3.0.30", "Orin (nvgpu)", "ab" * 32)
    'engines/teacher.fp16.trt10.3.0.30.orin-nvgpu.abababababababab.engine'
    """
    if len(onnx_sha256) < 16 or not re.fullmatch(r"[0-9a-f]+", onnx_sha256):
        raise ExportError(f"not a sha256 hex digest: {onnx_sha256!r}")
    return f"engines/{part}.{precision}.trt{_slug(trt_version)}.{_slug(gpu_name)}.{onnx_sha256[:16]}.engine"


def timing_cache_filename(trt_version: str, gpu_name: str) -> str:
    """Bundle-relative timing cache path for one TensorRT version and GPU."""
    return f"engines/timing.trt{_slug(trt_version)}.{_slug(gpu_name)}.cache"


def import_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`MissingExtraError` naming ``rdedge[trt]``."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingExtraError(
            "tensorrt", "trt", "TensorRT engines; on Jetson use JetPack's tensorrt in a venv with system site-packages"
        ) from None
    return trt


def gpu_name(gpu_id: int = 0) -> str:
    """Name of CUDA device ``gpu_id`` as pycuda reports it (the runtime compares against the same string)."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return str(cuda.Device(gpu_id).name())
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(gpu_id))
    except ImportError:
        pass
    raise MissingExtraError("pycuda", "trt", "to identify the GPU the engines are built for")


def _pin_fp32_layers(trt: Any, network: Any) -> int:
    """Weakly typed FP16: keep reductions, normalisations, softmax, unary exp/log/sqrt, div and pow in FP32."""
    lt = trt.LayerType
    keep = {lt.REDUCE, lt.NORMALIZATION, lt.SOFTMAX}
    unary = {trt.UnaryOperation.EXP, trt.UnaryOperation.LOG, trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP}
    binary = {trt.ElementWiseOperation.DIV, trt.ElementWiseOperation.POW}
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in keep
        if layer.type == lt.UNARY:
            layer.__class__ = trt.IUnaryLayer
            pin = layer.op in unary
        elif layer.type == lt.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            pin = layer.op in binary
        if pin:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def build_engine(
    trt: Any, onnx_path: Path, engine_path: Path, plan: PrecisionPlan, max_batch: int, timing_cache: Path
) -> None:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path`` (atomically).

    Raises:
        ExportError: the parser or the builder failed (parser errors are listed).
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse the ONNX: {errs}")
    config = builder.create_builder_config()
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.constrain_fp32_layers:
        n = _pin_fp32_layers(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.debug("%s: %d layer(s) pinned to FP32", onnx_path.name, n)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(int(d) for d in t.shape[1:])
        if any(d < 0 for d in rest):
            raise ExportError(f"{onnx_path}: input {t.name} has a dynamic axis besides the batch: {tuple(t.shape)}")
        profile.set_shape(t.name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    _write_atomic(engine_path, memoryview(serialized))
    _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))


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
    """Build engines for the five chain parts on this device and record them in the bundle's manifest.

    Engines already recorded for the same TensorRT version and GPU are replaced; engines for other devices stay.

    Args:
        bundle_dir: an exported bundle (verified before building).
        precision: precision of teacher/projection/ocbe/decoder (score is FP32).
        max_batch: top of the optimisation profile; default ``manifest.input.max_batch`` (written back to it).
        gpu_id: CUDA device ordinal.

    Returns:
        The rewritten, re-validated manifest.
    """
    from export.bundle_writer import finalize_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    trt = import_tensorrt()
    version, gpu = str(trt.__version__), gpu_name(gpu_id)
    batch = int(max_batch or manifest.input.max_batch)
    if batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {batch}")
    cache = bundle_dir / timing_cache_filename(version, gpu)
    new: list[EngineSpec] = []
    for part in [p.name for p in manifest.parts]:
        spec = manifest.part(part)
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
        log.info("building %s engine for %s (%s, TensorRT %s, %s)", plan.engine_precision, part, onnx_file,
                 version, "strongly typed" if plan.strongly_typed else "weakly typed")  # fmt: skip
        build_engine(trt, bundle_dir / onnx_file, bundle_dir / rel, plan, batch, cache)
        new.append(
            EngineSpec(
                part=part,
                file=rel,
                precision=plan.engine_precision,
                tensorrt_version=version,
                gpu_name=gpu,
                onnx_sha256=sha,
                max_batch=batch,
            )  # fmt: skip
        )
    kept = [e for e in manifest.engines if (e.tensorrt_version, e.gpu_name) != (version, gpu)]
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
