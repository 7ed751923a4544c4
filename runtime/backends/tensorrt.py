"""TensorRT 10 backend: the bundle's engines chained on one CUDA stream, intermediates kept on the GPU.

* Name-based API only: ``set_tensor_address``, ``set_input_shape``, ``execute_async_v3``.
* Every tensor name of the chain (``image``, ``f1``.., ``z``, ``d1``.., ``anomaly_map``, ``score``) gets ONE device
  buffer sized for ``manifest.input.max_batch``; a part's output buffer is the next part's input buffer (teacher's
  ``f1`` is score's ``f1``), so nothing goes back to the host between parts.
* Pinned host buffers for the image in and ``anomaly_map`` / ``score`` out; async copies on the same stream.
* Optional CUDA graph (``backend.cuda_graph``): after the first run at a batch size the whole chain (copies
  included) is captured once and replayed; per-part timings are then reported as one ``cuda_graph`` stage.
* Engines are only loaded when :func:`check_engine_compat` passes: same TensorRT version, same GPU, built from the
  very ONNX file the manifest hashes.

``tensorrt`` and ``pycuda`` are imported inside the class, so this module imports (for typing and for
:func:`check_engine_compat`) on a box without them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import OUTPUTS, Backend, parts_to_run
from runtime.bundle import EngineSpec, Manifest, PartSpec
from runtime.config import BackendConfig
from runtime.errors import BundleError, MissingExtraError, RdedgeError

logger = logging.getLogger(__name__)


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
    engine: EngineSpec, manifest: Manifest, trt_version: str, gpu_name: str, bundle_dir: str | Path | None = None
) -> None:
    """Refuse an engine that was not built by this TensorRT, on this GPU, from this bundle's ONNX part.

    TensorRT engines are neither portable across TensorRT versions nor across GPU models, and an engine built from
    an older export would silently score with stale weights.

    Args:
        engine: the manifest's entry for the engine.
        manifest: the bundle manifest (its ``files`` hold the ONNX sha256 of each part).
        trt_version: installed ``tensorrt.__version__``.
        gpu_name: name of the CUDA device that will run it (e.g. ``"NVIDIA H100 80GB HBM3"``, ``"Orin"``).
        bundle_dir: only used to name the bundle in the message.

    Raises:
        BundleError: listing every mismatch and how to rebuild.
    """
    problems = []
    if engine.tensorrt_version != trt_version:
        problems.append(f"built with TensorRT {engine.tensorrt_version}, installed is {trt_version}")
    if engine.gpu_name != gpu_name:
        problems.append(f"built for GPU {engine.gpu_name!r}, this device is {gpu_name!r}")
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
    manifest: Manifest, parts: list[str], trt_version: str, gpu_name: str, bundle_dir: str | Path | None = None
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
                check_engine_compat(eng, manifest, trt_version, gpu_name, bundle_dir)
            except BundleError as exc:
                errors.append(str(exc))
                continue
            chosen[part] = eng
            break
        else:
            raise BundleError(errors[0] if len(errors) == 1 else " | ".join(errors))
    return chosen


@dataclass
class _Part:
    name: str
    engine: Any  # trt.ICudaEngine
    context: Any  # trt.IExecutionContext
    inputs: list[str]
    outputs: list[str]


class TensorRTBackend(Backend):
    """Run the bundle's TensorRT engines (see the module docstring).

    Args:
        bundle_dir: the bundle directory.
        manifest: its (verified) manifest; ``manifest.engines`` must hold compatible engines for every part run.
        cfg: ``fused``, ``cuda_graph``, ``gpu_id`` (``device`` is ignored: TensorRT is always CUDA).

    Raises:
        MissingExtraError: tensorrt or pycuda missing (``rdedge[trt]``; on Jetson use JetPack's tensorrt).
        BundleError: missing or incompatible engines, tensor name/shape mismatches between parts.
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: Path, manifest: Manifest, cfg: BackendConfig) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingExtraError("tensorrt", "trt", "the tensorrt backend") from None
        try:
            import pycuda.driver as cuda
        except ImportError:
            raise MissingExtraError("pycuda", "trt", "the tensorrt backend") from None
        self._trt = trt
        self._cuda = cuda
        self._closed = True
        self._lock = threading.Lock()
        cuda.init()
        if cfg.gpu_id >= cuda.Device.count():
            raise RdedgeError(f"backend.gpu_id {cfg.gpu_id} but only {cuda.Device.count()} CUDA device(s) found")
        device = cuda.Device(cfg.gpu_id)
        gpu_name = str(device.name())
        # The primary context is the one the CUDA runtime (and TensorRT) uses; push it around every call so the
        # backend works from whichever thread calls run().
        self._ctx = device.retain_primary_context()
        self._ctx.push()
        self._device: dict[str, Any] = {}  # tensor name -> pycuda DeviceAllocation (shared by all parts)
        try:
            self._setup(bundle_dir, manifest, cfg, gpu_name)
        except BaseException:
            for buf in self._device.values():
                buf.free()
            self._ctx.pop()
            self._ctx.detach()
            raise
        self._ctx.pop()
        self._closed = False

    def _setup(self, bundle_dir: Path, manifest: Manifest, cfg: BackendConfig, gpu_name: str) -> None:
        trt, cuda = self._trt, self._cuda
        specs = parts_to_run(manifest, cfg.fused)
        engines = select_engines(manifest, [p.name for p in specs], trt.__version__, gpu_name, bundle_dir)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.max_batch = manifest.input.max_batch
        self.input_name = manifest.input.name
        self._parts: list[_Part] = []
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # tensor name -> (shape at max batch, dtype)
        for spec in specs:
            eng_spec = engines[spec.name]
            path = Path(bundle_dir) / eng_spec.file
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT could not deserialize the engine; rebuild it")
            context = engine.create_execution_context()
            if context is None:
                raise RdedgeError(f"{path}: could not create an execution context (out of GPU memory?)")
            part = _Part(spec.name, engine, context, [], [])
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                is_input = engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
                (part.inputs if is_input else part.outputs).append(tname)
                self._allocate(path, spec, tname, tuple(engine.get_tensor_shape(tname)),
                               np.dtype(trt.nptype(engine.get_tensor_dtype(tname))))  # fmt: skip
                context.set_tensor_address(tname, int(self._device[tname]))
            want = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
            if set(part.inputs) != want[0] or not want[1] <= set(part.outputs):
                raise BundleError(
                    f"{path}: engine tensors in={part.inputs} out={part.outputs} do not match manifest part "
                    f"{spec.name!r}; rebuild with `rdedge build-engines {bundle_dir}`"
                )
            self._parts.append(part)
            logger.info("tensorrt %s: loaded %s (%s, %s)", trt.__version__, path.name, eng_spec.precision, gpu_name)
        for name in (self.input_name, *OUTPUTS):
            if name not in self._device:
                raise BundleError(f"no engine of the chain has a tensor named {name!r}")
        self.stages = [p.name for p in self._parts]
        self._stream = cuda.Stream()
        self._host_in = cuda.pagelocked_empty(self._layout[self.input_name][0], self._layout[self.input_name][1])
        self._host_out = {k: cuda.pagelocked_empty(*self._layout[k]) for k in OUTPUTS}
        self._events = [cuda.Event() for _ in range(len(self._parts) + 1)]
        self._batch = -1  # batch size the input shapes are currently set for
        self._use_graph = cfg.cuda_graph
        self._graph: Any = None  # instantiated CUDA graph for self._batch
        self._graph_ms = 0.0

    def _allocate(self, path: Path, spec: PartSpec, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """One device buffer per tensor name, sized for ``max_batch``; a second part naming it must agree."""
        if any(d < 0 for d in shape[1:]) or not shape:
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
        self._device[name] = self._cuda.mem_alloc(max(1, int(np.prod(full)) * dtype.itemsize))

    def _set_batch(self, batch: int) -> None:
        for part in self._parts:
            for tname in part.inputs:
                shape = (batch, *self._layout[tname][0][1:])
                if not part.context.set_input_shape(tname, shape):
                    raise RdedgeError(f"tensorrt: part {part.name!r} rejects input {tname!r} shape {shape}")
        self._batch = batch
        self._graph = None

    def _enqueue(self, batch: int, timed: bool) -> None:
        """Queue copy-in, every part, copy-out on the stream (also what a CUDA graph captures)."""
        cuda, stream = self._cuda, self._stream
        n_in = batch * int(np.prod(self._layout[self.input_name][0][1:]))
        cuda.memcpy_htod_async(self._device[self.input_name], self._host_in.reshape(-1)[:n_in], stream)
        for i, part in enumerate(self._parts):
            if timed:
                self._events[i].record(stream)
            if not part.context.execute_async_v3(stream.handle):
                raise RdedgeError(f"tensorrt: execute_async_v3 failed for part {part.name!r}")
        if timed:
            self._events[-1].record(stream)
        for k in OUTPUTS:
            n_out = batch * int(np.prod(self._layout[k][0][1:]))
            cuda.memcpy_dtoh_async(self._host_out[k].reshape(-1)[:n_out], self._device[k], stream)

    def _capture(self, batch: int) -> None:
        """Capture the chain at ``batch`` into a CUDA graph; on any failure keep running without one."""
        stream = self._stream
        try:
            stream.begin_capture()
            try:
                self._enqueue(batch, timed=False)
            finally:
                graph = stream.end_capture()
            self._graph = graph.instance()
            logger.info("tensorrt: captured the chain in a CUDA graph (batch %d)", batch)
        except Exception as exc:  # pycuda without graph support, or a kernel that cannot be captured
            logger.warning("tensorrt: CUDA graph capture failed (%s); running without it", exc)
            self._use_graph = False
            self._graph = None

    def _launch_graph(self) -> bool:
        """Replay the captured graph and wait; on failure drop the graph and return False (caller runs plainly)."""
        t0 = time.perf_counter()
        try:
            self._graph.launch(self._stream)
            self._stream.synchronize()
        except Exception as exc:
            logger.warning("tensorrt: CUDA graph launch failed (%s); running without it", exc)
            self._use_graph = False
            self._graph = None
            return False
        self._graph_ms = (time.perf_counter() - t0) * 1e3
        return True

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """See :meth:`Backend.run`. Timings are GPU time per part from CUDA events (or one ``cuda_graph`` stage)."""
        x = inputs[self.input_name]
        batch = int(x.shape[0])
        if not 1 <= batch <= self.max_batch or x.shape[1:] != self._layout[self.input_name][0][1:]:
            raise ValueError(
                f"input {self.input_name!r} must be (1..{self.max_batch}, "
                f"{', '.join(map(str, self._layout[self.input_name][0][1:]))}), got {x.shape}"
            )
        # One set of buffers and one stream: callers on several threads (one per camera) take turns.
        with self._lock:
            return self._run_locked(x, batch)

    def _run_locked(self, x: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if self._closed:
            raise RdedgeError("tensorrt backend is closed")
        self._ctx.push()
        try:
            np.copyto(self._host_in[:batch], x, casting="same_kind")
            if batch != self._batch:
                self._set_batch(batch)
            timings: dict[str, float] = {}
            if self._graph is not None and self._launch_graph():
                timings["cuda_graph"] = self._graph_ms
            else:
                self._enqueue(batch, timed=True)
                self._stream.synchronize()
                for i, part in enumerate(self._parts):
                    timings[part.name] = float(self._events[i + 1].time_since(self._events[i]))
                # Capture after one plain run at this batch size (TensorRT allocates lazily on the first run).
                if self._use_graph:
                    self._capture(batch)
            outputs = {k: self._host_out[k][:batch].copy() for k in OUTPUTS}
        finally:
            self._ctx.pop()
        return outputs, timings

    def close(self) -> None:
        """Free device buffers, contexts and engines (in reverse order of creation). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def _release(self) -> None:
        self._ctx.push()
        try:
            self._stream.synchronize()
            self._graph = None
            for part in reversed(self._parts):  # contexts before engines before the runtime
                part.context = None
                part.engine = None
            self._parts = []
            self._runtime = None
            for buf in self._device.values():
                buf.free()
            self._device = {}
            # Drop the pinned host buffers while the context is current (outputs handed out were copies).
            self._host_out = {}
            self._host_in = np.empty(0, np.float32)
        finally:
            self._ctx.pop()
            self._ctx.detach()
