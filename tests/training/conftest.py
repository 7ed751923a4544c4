"""Shared training fixtures: synthetic data made once, a tiny RD run trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_train_config
from training.demo_data import make_demo_data


@pytest.fixture(scope="session")
def demo_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic MVTec-layout category (64 px)."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), n_train=20, n_test_good=6, n_test_defect=3, size=64)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, demo_category: Path) -> Path:
    """efficientnet_lite0 RD trained for 2 epochs at 64 px (a few seconds on CPU)."""
    from training.train import fit

    cfg = load_train_config(None, {"data.image_size": 64, "optim.epochs": 2, "optim.batch_size": 8})
    out = tmp_path_factory.mktemp("run")
    fit(cfg, demo_category, out, show_progress=False)
    return out
