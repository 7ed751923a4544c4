"""Shared training fixtures: synthetic data made once, a tiny RD run trained once per session.

Torch runs single-threaded here: at 64 px the tensors are too small to gain from intra-op threads, and on a shared
2-core box the default (one thread per core) oversubscribes the CPU and makes a short ``fit`` ten times slower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import load_train_config
from training.demo_data import make_demo_data

#: Overrides of every short training run in these tests: 64 px, 8 images a step, evaluated every 3 steps.
FAST: dict[str, Any] = {"data.image_size": 64, "optim.batch_size": 8, "selection.every_steps": 3}


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> Iterator[None]:
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the CLI and torchrun subprocesses too
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def demo_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic MVTec-layout category (64 px): 20 train/good (2 kept for validation), 6 + 4x3 test."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), n_train=20, n_test_good=6, n_test_defect=3, size=64)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, demo_category: Path) -> Path:
    """efficientnet_lite0 RD trained for 6 steps at 64 px, selection at steps 3 and 6 (a few seconds on CPU)."""
    from training.train import fit

    cfg = load_train_config(None, {**FAST, "optim.steps": 6})
    out = tmp_path_factory.mktemp("run")
    fit(cfg, demo_category, out, show_progress=False)
    return out
