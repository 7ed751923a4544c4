"""The backend interface: named float32 host arrays in, ``anomaly_map`` and ``score`` out, plus per-part latency."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

import numpy as np

from runtime.bundle import Manifest, PartSpec
from runtime.config import BackendConfig
from runtime.errors import BundleError

logger = logging.getLogger(__name__)

OUTPUTS = ("anomaly_map", "score")


class Backend(ABC):
    """Runs a bundle's chain of parts (or its fused graph) on one device.

    Attributes:
        name: backend kind, ``"onnxruntime"`` or ``"tensorrt"``.
        stages: the timing keys :meth:`run` reports, in execution order (part names, or ``["fused"]``).
    """

    name: str = ""
    stages: list[str]

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Run the model on one batch.

        Args:
            inputs: ``{"image": (B, 3, H, W) float32}`` (the manifest's input name), C-contiguous host array.

        Returns:
            ``(outputs, timings_ms)``: host arrays ``anomaly_map`` ``(B, 1, H, W)`` float32 and ``score`` ``(B,)``
            float32 (owned by the caller), and the latency of each stage in milliseconds.
        """

    @abstractmethod
    def close(self) -> None:
        """Release sessions, engines and device memory. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def parts_to_run(manifest: Manifest, fused: bool) -> list[PartSpec]:
    """The parts a backend runs: the fused graph alone, or the chain in order."""
    if fused:
        if manifest.fused is None:
            raise BundleError(
                f"backend.fused is true but bundle {manifest.model_id!r} has no fused model.onnx; "
                "set backend.fused: false or re-export with the fused graph"
            )
        return [manifest.fused]
    return list(manifest.parts)


def create_backend(bundle_dir: Path, manifest: Manifest, cfg: BackendConfig) -> Backend:
    """Build the backend ``cfg.kind`` names for this bundle.

    Raises:
        MissingExtraError: the backend's package is not installed (``rdedge[cpu]`` or ``rdedge[trt]``).
        BundleError: the bundle lacks what the config asks for (fused graph, compatible engines).
        RdedgeError: the device is not usable (e.g. cuda requested without a CUDA provider).
    """
    if cfg.kind == "onnxruntime":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(Path(bundle_dir), manifest, cfg)
    if cfg.kind == "tensorrt":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(Path(bundle_dir), manifest, cfg)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")  # unreachable: BackendConfig.kind is a Literal
