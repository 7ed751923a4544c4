"""TensorRT 10 backend: the bundle's engines chained on one CUDA stream, intermediates kept on the GPU.

* Name-based API only: ``set_tensor_address``, ``set_input_shape``, ``execute_async_v3``.
* CUDA through cuda-python's runtime API (:mod:`runtime.backends.cuda_rt`), the API TensorRT itself uses: the
  device is selected with ``cudaSetDevice(gpu_id)`` on whichever thread calls, no context juggling.
* Every tensor name of the chain (``image``, ``f1``.., ``z``, ``d1``.., ``anomaly_map``, ``score``) gets ONE device
  buffer sized for the engines' max batch; a part's output buffer is the next part's input buffer (teacher's ``f1``
  is score's ``f1``), so nothing goes back to the host between parts.
* The max batch is the top of the engines' optimisation profiles (``get_tensor_profile_shape``), the smallest over
  the chain: an engine is what it was built for, whatever the manifest says.
* One activation scratch buffer for all engines: the contexts are created ``USER_MANAGED`` and all point at one
  allocation of the largest ``device_memory_size_v2``; the parts run one after the other on one stream, so they
  never use it at the same time (on an 8 GB Orin five private pools add up).
* Pinned host buffers for the image in and ``anomaly_map`` / ``score`` out; async copies on the same stream.
* Optional CUDA graph (``backend.cuda_graph``): after one plain run at a batch size (TensorRT finishes its lazy
  set-up there), copy-in, every part and copy-out are captured once (``cudaStreamBeginCapture`` ..
  ``cudaGraphInstantiateWithFlags``) and replayed with ``cudaGraphLaunch``; timings are then one ``cuda_graph``
  stage (GPU time from CUDA events around the launch).
* Engines are only loaded when :func:`check_engine_compat` passes: same TensorRT version, same GPU (name, compute
  capability, SM count), built from the very ONNX file the manifest hashes.
* One process-wide ``trt.Logger`` (:func:`trt_logger`): TensorRT keeps the first logger it is given, so a logger
  owned by a backend would dangle once that backend is freed while another one lives (bundle reload).

``tensorrt`` and cuda-python are imported inside the class, so this module imports (for typing and for
:func:`check_engine_compat`) on a box without them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import cuda_rt
from runtime.backends.base import OUTPUTS, Backend, parts_to_run
from runtime.backends.cuda_rt import GpuIdentity, check
from runtime.bundle import EngineSpec, Manifest, PartSpec
from runtime.config import BackendConfig
from runtime.errors import BundleError, MissingExtraError, RdedgeError

logger = logging.getLogger(__name__)

_TRT_LOGGER: Any = None
_TRT_LOGGER_LOCK = threading.Lock()


def trt_logger(trt: Any) -> Any:
    """The one ``trt.Logger`` of this process (WARNING and worse), shared by every runtime and builder."""
    global _TRT_LOGGER
    with _TRT_LOGGER_LOCK:
        if _TRT_LOGGER is None:
            _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
        return _TRT_LOGGER


def import_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`MissingExtraError` naming ``rdedge[trt]``."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingExtraError(
            "tensorrt", "trt", "TensorRT engines; on Jetson use JetPack's tensorrt in a venv with system site-packages"
        ) from None
    return trt


def _part_file(manifest: Manifest, part: str) -> str:
    if part == "fused":
        if manifest.fused is None:
            raise BundleError("engine for part 'fused' but the manifest has no fused graph")
        return manifest.fused.file
    try:
        return manifest.part(part).file
    except KeyError:
        raise BundleError(f"engine for unknown part {part!r} (parts: {[p.name for p in manifest.parts]})") from None


def check_engine_compat(
    engine: EngineSpec, manifest: Manifest, trt_version: str, gpu: GpuIdentity, bundle_dir: str | Path | None = None
) -> None:
    """Refuse an engine that was not built by this TensorRT, on this kind of GPU, from this bundle's ONNX part.

    TensorRT engines are neither portable across TensorRT versions nor across GPU models (the name alone does not
    tell Orin AGX / NX / Nano apart: compute capability and SM count do), and an engine built from an older export
    would silently score with stale weights.

    Args:
        engine: the manifest's entry for the engine.
        manifest: the bundle manifest (its ``files`` hold the ONNX sha256 of each part).
        trt_version: installed ``tensorrt.__version__``.
        gpu: the CUDA device that will run it (:func:`runtime.backends.cuda_rt.device_identity`).
        bundle_dir: only used to name the bundle in the message.

    Raises:
        BundleError: listing every mismatch and how to rebuild.
    """
    problems = []
    if engine.tensorrt_version != trt_version:
        problems.append(f"built with TensorRT {engine.tensorrt_version}, installed is {trt_version}")
    if engine.gpu_name != gpu.name:
        problems.append(f"built for GPU {engine.gpu_name!r}, this device is {gpu.name!r}")
    if engine.compute_capability is None or engine.sm_count is None:
        problems.append("recorded without the GPU's compute capability and SM count (built by an older rdedge)")
    elif (engine.compute_capability, engine.sm_count) != (gpu.cc, gpu.sm_count):
        problems.append(
            f"built for compute capability {engine.compute_capability} with {engine.sm_count} SMs, this device has "
            f"{gpu.cc} with {gpu.sm_count}"
        )
    onnx_file = _part_file(manifest, engine.part)
    expected = manifest.files.get(onnx_file)
    if engine.onnx_sha256 != expected:
        problems.append(
            f"built from an ONNX with sha256 {engine.onnx_sha256[:12]}..., but {onnx_file} in this bundle has "
            f"{(expected or '<none>')[:12]}..."
        )
    if problems:
        where = str(bundle_dir) if bundle_dir is not None else "BUNDLE"
        raise BundleError(
            f"TensorRT engine {engine.file} (part {engine.part!r}) cannot be used: {'; '.join(problems)}; "
            f"rebuild with `rdedge build-engines {where}`"
        )


def select_engines(
    manifest: Manifest, parts: list[str], trt_version: str, gpu: GpuIdentity, bundle_dir: str | Path | None = None
) -> dict[str, EngineSpec]:
    """Pick one compatible engine per part (first compatible in manifest order).

    Raises:
        BundleError: a part has no engine, or none of its engines is compatible (the message lists why).
    """
    chosen: dict[str, EngineSpec] = {}
    where = str(bundle_dir) if bundle_dir is not None else "BUNDLE"
    for part in parts:
        candidates = [e for e in manifest.engines if e.part == part]
        if not candidates:
            raise BundleError(
                f"bundle {manifest.model_id!r} has no TensorRT engine for part {part!r}; "
                f"build them on this device with `rdedge build-engines {where}`"
            )
        errors = []
        for eng in candidates:
            try:
                check_engine_compat(eng, manifest, trt_version, gpu, bundle_dir)
            except BundleError as exc:
                errors.append(str(exc))
                continue
            chosen[part] = eng
            break
        else:
            raise BundleError(errors[0] if len(errors) == 1 else " | ".join(errors))
    return chosen


def profile_max_batch(profiles: Iterable[tuple[str, Sequence[int], Sequence[int]]]) -> int:
    """The largest batch every engine of the chain accepts.

    Args:
        profiles: ``(tensor name, engine shape, profile max shape)`` of every engine input; the engine shape has
            ``-1`` on a dynamic batch axis, and then the profile max bounds it.

    Raises:
        BundleError: no inputs, or an engine whose max batch is below 1.
    """
    best: int | None = None
    for name, shape, max_shape in profiles:
        if not shape:
            raise BundleError(f"engine input {name!r} is a scalar; rdedge engines take a batch axis")
        top = int(max_shape[0]) if int(shape[0]) < 0 else int(shape[0])
        if top < 1:
            raise BundleError(f"engine input {name!r} accepts no batch (profile max {tuple(max_shape)})")
        best = top if best is None else min(best, top)
    if best is None:
        raise BundleError("the engines of the chain have no inputs")
    return best


@dataclass
class _Part:
    name: str
    engine: Any  # trt.ICudaEngine
    context: Any  # trt.IExecutionContext
    runtime_config: Any  # trt.IRuntimeConfig it was created with (TensorRT >= 10.11), else None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _device_memory_size(engine: Any) -> int:
    """Activation memory an execution context of ``engine`` needs (max over its profiles), in bytes."""
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1 (int64)
    return int(size if size is not None else engine.device_memory_size)


def _create_user_managed_context(trt: Any, engine: Any) -> tuple[Any, Any]:
    """An execution context that allocates no activation memory of its own (``USER_MANAGED``).

    TensorRT >= 10.11 takes the strategy through an ``IRuntimeConfig`` (the form TensorRT 11 keeps); 10.0 .. 10.10
    take it as ``create_execution_context``'s argument.

    Returns:
        ``(context, runtime_config or None)``; the caller keeps the config alive as long as the context.
    """
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if hasattr(engine, "create_runtime_config"):
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config), config
    return engine.create_execution_context(strategy), None


def _set_device_memory(context: Any, ptr: int, size: int) -> None:
    """Point a ``USER_MANAGED`` context at ``size`` bytes at ``ptr``."""
    setter = getattr(context, "set_device_memory", None)  # TensorRT >= 10.1
    if setter is not None:
        setter(ptr, size)
    else:  # TensorRT 10.0: write-only property
        context.device_memory = ptr


class TensorRTBackend(Backend):
    """Run the bundle's TensorRT engines (see the module docstring).

    Args:
        bundle_dir: the bundle directory.
        manifest: its (verified) manifest; ``manifest.engines`` must hold compatible engines for every part run.
        cfg: ``fused``, ``cuda_graph``, ``gpu_id`` (``device`` is ignored: TensorRT is always CUDA).

    Raises:
        MissingExtraError: tensorrt or cuda-python missing (``rdedge[trt]``; on Jetson JetPack's tensorrt and
            ``rdedge[jetson]``).
        BundleError: missing or incompatible engines, tensor name/shape mismatches between parts.
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: Path, manifest: Manifest, cfg: BackendConfig) -> None:
        trt = import_tensorrt()
        rt = cuda_rt.cudart()
        self._trt, self._rt = trt, rt
        self._closed = True
        self._lock = threading.Lock()
        self._gpu_id = cfg.gpu_id
        self.gpu = cuda_rt.device_identity(cfg.gpu_id)
        cuda_rt.set_device(cfg.gpu_id)
        # Everything _release frees; filled as it is created so a failure half-way frees what exists.
        self._device: dict[str, int] = {}  # tensor name -> device pointer (shared by all parts)
        self._host: dict[str, np.ndarray] = {}  # image / anomaly_map / score -> view of pinned memory
        self._host_ptrs: list[int] = []
        self._scratch = 0  # the shared activation buffer
        self.scratch_bytes = 0
        self._events: list[Any] = []
        self._stream: Any = None
        self._graph: Any = None  # cudaGraph_t of the captured chain
        self._graph_exec: Any = None  # its cudaGraphExec_t
        self._parts: list[_Part] = []
        self._runtime: Any = None
        try:
            self._setup(bundle_dir, manifest, cfg)
        except BaseException:
            self._release()
            raise
        self._closed = False

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self, bundle_dir: Path, manifest: Manifest, cfg: BackendConfig) -> None:
        trt, rt = self._trt, self._rt
        specs = parts_to_run(manifest, cfg.fused)
        engines = select_engines(manifest, [p.name for p in specs], trt.__version__, self.gpu, bundle_dir)
        self._runtime = trt.Runtime(trt_logger(trt))
        self.input_name = manifest.input.name
        loaded: list[tuple[PartSpec, Path, Any]] = []
        for spec in specs:
            path = Path(bundle_dir) / engines[spec.name].file
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT could not deserialize the engine; rebuild it")
            loaded.append((spec, path, engine))
        self.max_batch = profile_max_batch(
            (name, tuple(engine.get_tensor_shape(name)), tuple(engine.get_tensor_profile_shape(name, 0)[2]))
            for _, _, engine in loaded
            for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        )
        if self.max_batch != manifest.input.max_batch:
            logger.info("tensorrt: engines accept batch 1..%d (manifest says %d)", self.max_batch,
                        manifest.input.max_batch)  # fmt: skip
        scratch = max(_device_memory_size(engine) for _, _, engine in loaded)
        self._scratch = check(rt.cudaMalloc(max(scratch, 256)), "cudaMalloc(scratch)")
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # tensor -> (shape at max batch, dtype)
        for spec, path, engine in loaded:
            context, runtime_config = _create_user_managed_context(trt, engine)
            if context is None:
                raise RdedgeError(f"{path}: could not create an execution context (out of GPU memory?)")
            _set_device_memory(context, self._scratch, max(scratch, 256))
            part = _Part(spec.name, engine, context, runtime_config)
            self._parts.append(part)
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                is_input = engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
                (part.inputs if is_input else part.outputs).append(tname)
                self._allocate(path, spec, tname, tuple(engine.get_tensor_shape(tname)),
                               np.dtype(trt.nptype(engine.get_tensor_dtype(tname))))  # fmt: skip
                if not context.set_tensor_address(tname, self._device[tname]):
                    raise RdedgeError(f"{path}: TensorRT refused the address of tensor {tname!r}")
            want = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
            if set(part.inputs) != want[0] or not want[1] <= set(part.outputs):
                raise BundleError(
                    f"{path}: engine tensors in={part.inputs} out={part.outputs} do not match manifest part "
                    f"{spec.name!r}; rebuild with `rdedge build-engines {bundle_dir}`"
                )
            logger.info("tensorrt %s: loaded %s (%s, %s)", trt.__version__, path.name,
                        engines[spec.name].precision, self.gpu)  # fmt: skip
        for name in (self.input_name, *OUTPUTS):
            if name not in self._device:
                raise BundleError(f"no engine of the chain has a tensor named {name!r}")
        self.scratch_bytes = max(scratch, 256)
        self.stages = [p.name for p in self._parts]
        flags = getattr(rt, "cudaStreamNonBlocking", 1)  # capture is not allowed on the legacy default stream
        self._stream = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        for _ in range(len(self._parts) + 1):
            self._events.append(check(rt.cudaEventCreate(), "cudaEventCreate"))
        for name in (self.input_name, *OUTPUTS):
            shape, dtype = self._layout[name]
            ptr = check(rt.cudaMallocHost(max(1, int(np.prod(shape)) * dtype.itemsize)), "cudaMallocHost")
            self._host_ptrs.append(ptr)
            self._host[name] = cuda_rt.host_view(ptr, shape, dtype)
        self._batch = -1  # batch size the input shapes are currently set for
        self._use_graph = cfg.cuda_graph

    def _allocate(self, path: Path, spec: PartSpec, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """One device buffer per tensor name, sized for ``max_batch``; a second part naming it must agree."""
        if not shape or any(d < 0 for d in shape[1:]):
            raise BundleError(f"{path}: tensor {name!r} has dynamic non-batch dims {shape}; only batch may be -1")
        full = (self.max_batch, *shape[1:]) if shape[0] < 0 else shape
        if name in self._layout:
            if self._layout[name] != (full, dtype):
                raise BundleError(
                    f"{path}: tensor {name!r} is {full} {dtype} in part {spec.name!r} but "
                    f"{self._layout[name][0]} {self._layout[name][1]} in an earlier part"
                )
            return
        self._layout[name] = (full, dtype)
        nbytes = max(1, int(np.prod(full)) * dtype.itemsize)
        self._device[name] = check(self._rt.cudaMalloc(nbytes), f"cudaMalloc({name})")

    # ------------------------------------------------------------------------------------------------ running
    def _set_batch(self, batch: int) -> None:
        self._drop_graph()
        for part in self._parts:
            for tname in part.inputs:
                shape = (batch, *self._layout[tname][0][1:])
                if not part.context.set_input_shape(tname, shape):
                    raise RdedgeError(f"tensorrt: part {part.name!r} rejects input {tname!r} shape {shape}")
        self._batch = batch

    def _enqueue(self, batch: int, timed: bool) -> None:
        """Queue copy-in, every part, copy-out on the stream (also what a CUDA graph captures)."""
        rt, stream = self._rt, self._stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        src = self._host[self.input_name].ctypes.data
        n_in = batch * self._sample_bytes(self.input_name)
        check(rt.cudaMemcpyAsync(self._device[self.input_name], src, n_in, h2d, stream), "cudaMemcpyAsync(image)")
        for i, part in enumerate(self._parts):
            if timed:
                check(rt.cudaEventRecord(self._events[i], stream), "cudaEventRecord")
            if not part.context.execute_async_v3(int(stream)):
                raise RdedgeError(f"tensorrt: execute_async_v3 failed for part {part.name!r}")
        if timed:
            check(rt.cudaEventRecord(self._events[-1], stream), "cudaEventRecord")
        for k in OUTPUTS:
            dst, n_out = self._host[k].ctypes.data, batch * self._sample_bytes(k)
            check(rt.cudaMemcpyAsync(dst, self._device[k], n_out, d2h, stream), f"cudaMemcpyAsync({k})")

    def _sample_bytes(self, name: str) -> int:
        shape, dtype = self._layout[name]
        return int(np.prod(shape[1:])) * dtype.itemsize

    def _capture(self, batch: int) -> None:
        """Capture the chain at ``batch`` into a CUDA graph; on failure log why and keep running without one."""
        rt, stream = self._rt, self._stream
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads may still cudaMalloc
        try:
            check(rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            try:
                self._enqueue(batch, timed=False)
            finally:
                # End the capture whatever happened, or the stream stays unusable.
                graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            self._graph = graph
            self._graph_exec = check(rt.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiateWithFlags")
            logger.info("tensorrt: captured the chain in a CUDA graph (batch %d)", batch)
        except (RdedgeError, RuntimeError) as exc:
            logger.warning("tensorrt: CUDA graph capture failed (%s); running without a graph", exc)
            self._drop_graph()
            self._use_graph = False

    def _drop_graph(self) -> None:
        rt = self._rt
        if self._graph_exec is not None:
            check(rt.cudaGraphExecDestroy(self._graph_exec), "cudaGraphExecDestroy")
            self._graph_exec = None
        if self._graph is not None:
            check(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None

    @property
    def graph_captured(self) -> bool:
        """True while a CUDA graph of the chain is instantiated (``backend.cuda_graph`` after the first run)."""
        return self._graph_exec is not None

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """See :meth:`Backend.run`. Timings are GPU time per part from CUDA events (or one ``cuda_graph`` stage)."""
        if self._closed:
            raise RdedgeError("tensorrt backend is closed")
        x = inputs[self.input_name]
        batch = int(x.shape[0]) if x.ndim else 0
        sample = self._layout[self.input_name][0][1:]
        if not 1 <= batch <= self.max_batch or tuple(x.shape[1:]) != sample:
            raise ValueError(
                f"input {self.input_name!r} must be (1..{self.max_batch}, {', '.join(map(str, sample))}), got {x.shape}"
            )
        # One set of buffers and one stream: callers on several threads (one per camera) take turns.
        with self._lock:
            return self._run_locked(x, batch)

    def _run_locked(self, x: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if self._closed:
            raise RdedgeError("tensorrt backend is closed")
        rt, stream, ev = self._rt, self._stream, self._events
        cuda_rt.set_device(self._gpu_id)  # the device is per thread in the runtime API
        np.copyto(self._host[self.input_name][:batch], x, casting="same_kind")
        if batch != self._batch:
            self._set_batch(batch)
        timings: dict[str, float] = {}
        if self._graph_exec is not None:
            check(rt.cudaEventRecord(ev[0], stream), "cudaEventRecord")
            check(rt.cudaGraphLaunch(self._graph_exec, stream), "cudaGraphLaunch")
            check(rt.cudaEventRecord(ev[-1], stream), "cudaEventRecord")
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            timings["cuda_graph"] = float(check(rt.cudaEventElapsedTime(ev[0], ev[-1]), "cudaEventElapsedTime"))
        else:
            self._enqueue(batch, timed=True)
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            for i, part in enumerate(self._parts):
                ms = check(rt.cudaEventElapsedTime(ev[i], ev[i + 1]), "cudaEventElapsedTime")
                timings[part.name] = float(ms)
            # Capture after one plain run at this batch size (TensorRT allocates lazily on the first run).
            if self._use_graph:
                self._capture(batch)
        outputs = {k: self._host[k][:batch].copy() for k in OUTPUTS}
        return outputs, timings

    # ------------------------------------------------------------------------------------------------ closing
    def close(self) -> None:
        """Free graph, contexts, engines, buffers, events and stream (in reverse order of creation). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Free whatever exists; every step runs even if an earlier one fails (the first error is logged)."""
        rt = self._rt

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                res = fn(*args)
                if res is not None:
                    check(res, what)
            except Exception as exc:  # noqa: BLE001 - keep freeing the rest
                logger.warning("tensorrt: %s failed while closing: %s", what, exc)

        attempt("cudaSetDevice", rt.cudaSetDevice, self._gpu_id)
        if self._stream is not None:
            attempt("cudaStreamSynchronize", rt.cudaStreamSynchronize, self._stream)
        attempt("dropping the CUDA graph", self._drop_graph)
        for part in reversed(self._parts):  # contexts before engines before the runtime
            part.context = None
            part.runtime_config = None
            part.engine = None
        self._parts = []
        self._runtime = None
        for ptr in self._device.values():
            attempt("cudaFree", rt.cudaFree, ptr)
        self._device = {}
        if self._scratch:
            attempt("cudaFree(scratch)", rt.cudaFree, self._scratch)
            self._scratch = 0
        self._host = {}  # the views go before the memory under them (outputs handed out were copies)
        for ptr in self._host_ptrs:
            attempt("cudaFreeHost", rt.cudaFreeHost, ptr)
        self._host_ptrs = []
        for event in self._events:
            attempt("cudaEventDestroy", rt.cudaEventDestroy, event)
        self._events = []
        if self._stream is not None:
            attempt("cudaStreamDestroy", rt.cudaStreamDestroy, self._stream)
            self._stream = None
