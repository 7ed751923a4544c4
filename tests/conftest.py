"""Suite-wide pytest set-up: GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def _has_cuda() -> bool:
    if os.environ.get("RDEDGE_NO_GPU"):
        return False
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for tests
            return False
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
