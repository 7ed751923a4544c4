"""The few CUDA runtime calls the TensorRT backend and the engine builder make, through cuda-python.

cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` in releases before 12.6.1) ships binary wheels for x86_64
and aarch64, wraps the runtime API that TensorRT itself uses (same device selection, same primary context) and, unlike
pycuda, has stream capture, so CUDA graphs work. Every call returns ``(cudaError_t, *results)``; :func:`check` turns
a failure into :class:`CudaError` naming the call.

:class:`GpuIdentity` (name, compute capability, SM count) is the device key of TensorRT engines: Orin AGX, NX and
Nano all report the name ``"Orin"`` but differ in SM count. Its pure parts are tested without a GPU.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import MissingExtraError, RdedgeError

_CUDART: Any = None


class CudaError(RdedgeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error name."""


def cudart() -> Any:
    """The cuda-python runtime module, imported once.

    Raises:
        MissingExtraError: cuda-python is not installed (``rdedge[trt]``; on Jetson ``rdedge[jetson]``).
    """
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6.1
        except ImportError:
            try:
                from cuda import cudart as rt  # older cuda-python
            except ImportError:
                raise MissingExtraError("cuda-python", "trt", "CUDA calls of the tensorrt backend") from None
        _CUDART = rt
    return _CUDART


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result ``(err, *values)``.

    Returns:
        ``None`` for no value, the value for one, the tuple for several.

    Raises:
        CudaError: ``err`` is not ``cudaSuccess``.
    """
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    code = int(getattr(err, "value", err))
    if code != 0:
        name = getattr(err, "name", str(code))
        raise CudaError(f"CUDA {call} failed: {name} ({code})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is keyed by besides the TensorRT version.

    Attributes:
        name: ``cudaDeviceProp.name`` (``"NVIDIA H100 80GB HBM3"``, ``"Orin"``).
        compute_capability: ``(major, minor)``, e.g. ``(8, 7)`` for every Orin.
        sm_count: streaming multiprocessors (AGX Orin 64 GB: 16, Orin NX / Nano 8 GB: 8, Orin Nano 4 GB: 4).
    """

    name: str
    compute_capability: tuple[int, int]
    sm_count: int

    @property
    def cc(self) -> str:
        """Compute capability as ``"major.minor"`` (the manifest's spelling)."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def slug(self) -> str:
        """File-name-safe key, e.g. ``"orin.sm87.8sm"``.

        >>> GpuIdentity("Orin (nvgpu)", (8, 7), 8).slug()
        'orin-nvgpu.sm87.8sm'
        """
        name = re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-").lower() or "gpu"
        return f"{name}.sm{self.compute_capability[0]}{self.compute_capability[1]}.{self.sm_count}sm"

    def __str__(self) -> str:
        return f"{self.name} (sm {self.cc}, {self.sm_count} SMs)"


def identity_from_props(name: bytes | str, major: int, minor: int, sm_count: int) -> GpuIdentity:
    """Build a :class:`GpuIdentity` from ``cudaDeviceProp`` fields (``name`` is a NUL-padded C string)."""
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return GpuIdentity(str(name).strip(), (int(major), int(minor)), int(sm_count))


def device_count() -> int:
    """Number of CUDA devices (0 when the driver has none)."""
    rt = cudart()
    err, n = rt.cudaGetDeviceCount()
    return int(n) if int(getattr(err, "value", err)) == 0 else 0


def device_identity(gpu_id: int) -> GpuIdentity:
    """Name, compute capability and SM count of CUDA device ``gpu_id``.

    Raises:
        RdedgeError: no such device.
    """
    n = device_count()
    if not 0 <= gpu_id < n:
        raise RdedgeError(f"gpu_id {gpu_id} but {n} CUDA device(s) found")
    prop = check(cudart().cudaGetDeviceProperties(gpu_id), "cudaGetDeviceProperties")
    return identity_from_props(prop.name, prop.major, prop.minor, prop.multiProcessorCount)


def set_device(gpu_id: int) -> None:
    """Make ``gpu_id`` current for this thread (the runtime API and TensorRT use the current device)."""
    check(cudart().cudaSetDevice(gpu_id), f"cudaSetDevice({gpu_id})")


def host_view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array over ``prod(shape) * itemsize`` bytes of host memory at ``ptr`` (no copy, no ownership)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = (ctypes.c_byte * max(1, nbytes)).from_address(ptr)
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
