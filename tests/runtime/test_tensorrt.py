"""Pure parts of the TensorRT backend: max batch from the engines' profiles, the GPU key, CUDA result unpacking.

The GPU tests (``test_tensorrt_gpu.py``) check the same decisions against real engines.
"""

from __future__ import annotations

import ctypes
import enum

import numpy as np
import pytest

from runtime.backends.cuda_rt import CudaError, GpuIdentity, check, host_view, identity_from_props
from runtime.backends.tensorrt import profile_max_batch
from runtime.errors import BundleError


def test_max_batch_is_the_smallest_profile_top_of_the_chain() -> None:
    profiles = [
        ("image", (-1, 3, 64, 64), (8, 3, 64, 64)),
        ("f1", (-1, 24, 16, 16), (4, 24, 16, 16)),  # a part built with --max-batch 4 bounds the chain
        ("z", (-1, 64, 2, 2), (8, 64, 2, 2)),
    ]
    assert profile_max_batch(profiles) == 4
    # a static batch axis is its own bound, whatever the profile says
    assert profile_max_batch([("image", (2, 3, 64, 64), (2, 3, 64, 64)), ("f1", (-1, 8), (16, 8))]) == 2


def test_max_batch_refuses_empty_or_scalar_inputs() -> None:
    with pytest.raises(BundleError, match="no inputs"):
        profile_max_batch([])
    with pytest.raises(BundleError, match="scalar"):
        profile_max_batch([("x", (), ())])
    with pytest.raises(BundleError, match="accepts no batch"):
        profile_max_batch([("x", (-1, 3), (0, 3))])


def test_gpu_identity_from_device_properties() -> None:
    # cudaDeviceProp.name is a char[256]: cuda-python hands it over as bytes, NUL padding included on some releases
    gpu = identity_from_props(b"Orin\x00\x00\x00garbage", 8, 7, 8)
    assert gpu == GpuIdentity("Orin", (8, 7), 8)
    assert gpu.cc == "8.7" and gpu.slug() == "orin.sm87.8sm" and str(gpu) == "Orin (sm 8.7, 8 SMs)"
    assert identity_from_props("NVIDIA H200", 9, 0, 132).slug() == "nvidia-h200.sm90.132sm"
    assert GpuIdentity("Orin", (8, 7), 16) != gpu  # AGX Orin vs Orin Nano 8 GB


class _Err(enum.IntEnum):  # the shape of cuda-python's cudaError_t: an int enum with .name / .value
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def test_check_unpacks_cuda_python_results() -> None:
    assert check((_Err.cudaSuccess,), "cudaFree") is None
    assert check((_Err.cudaSuccess, 1234), "cudaMalloc") == 1234
    assert check((_Err.cudaSuccess, 1, 2), "cudaX") == (1, 2)
    with pytest.raises(CudaError, match=r"CUDA cudaMalloc\(scratch\) failed: cudaErrorMemoryAllocation \(2\)"):
        check((_Err.cudaErrorMemoryAllocation, 0), "cudaMalloc(scratch)")


def test_host_view_writes_through_to_the_memory() -> None:
    buf = (ctypes.c_byte * 48)()
    view = host_view(ctypes.addressof(buf), (3, 4), np.dtype(np.float32))
    view[1] = 2.5
    assert view.shape == (3, 4) and view.flags.writeable
    np.testing.assert_array_equal(np.frombuffer(bytes(buf), np.float32).reshape(3, 4)[1], 2.5)
