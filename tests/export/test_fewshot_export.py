"""Few-shot mode end to end: ``rdedge train --shots K`` -> ``rdedge export`` -> the runtime serves the 3-part chain.

Real parts: synthetic MVTec-layout files, the lite0 teacher from the wheel fine-tuned for two steps, ONNX export
with parity, onnxruntime through the runtime's ``AnomalyModel`` (its load-time calibration check included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.cli import main
from runtime.bundle import CHAIN_FEWSHOT, load_manifest
from runtime.config import BackendConfig
from runtime.engine import AnomalyModel
from training.data import preprocess, read_image
from training.demo_data import make_demo_data
from training.fewshot import load_fewshot


@pytest.fixture(scope="module")
def fewshot_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("fewshot")
    cat = make_demo_data(base / "data", n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=3)
    run, bundle = base / "run", base / "bundle"
    torch.set_num_threads(2)
    argv = ["train", "--data", str(cat), "--out", str(run), "--shots", "2", "--image-size", "64", "--steps", "2"]
    assert main(argv) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    return cat, run, bundle


def test_bundle_has_the_fewshot_chain_and_the_k_image_threshold(fewshot_bundle: tuple[Path, Path, Path]) -> None:
    _, _, bundle = fewshot_bundle
    m = load_manifest(bundle)
    assert [p.name for p in m.parts] == list(CHAIN_FEWSHOT)
    assert "leave-one-out" in m.threshold.rule and "K = 2" in m.threshold.source
    assert m.extra["objective"] == "fewshot" and m.calibration is not None and len(m.calibration.scores) == 2
    assert max(v for k, v in m.parity.items() if k.endswith("_max_rel")) <= 1e-4


def test_runtime_scores_match_torch_on_two_images(fewshot_bundle: tuple[Path, Path, Path]) -> None:
    cat, run, bundle = fewshot_bundle
    model, cfg, _ = load_fewshot(run)
    good, defect = sorted((cat / "test" / "good").iterdir())[0], sorted((cat / "test" / "crack").iterdir())[0]
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=1)) as am:
        assert am.calibration is not None  # the K frames reproduced their recorded scores at load
        got = [am.predict(read_image(p)) for p in (good, defect)]
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x = torch.from_numpy(np.stack([preprocess(read_image(p), (64, 64), mean, std) for p in (good, defect)]))
    with torch.no_grad():
        amap, score = model(x)
    for i, p in enumerate(got):
        assert p.score == pytest.approx(float(score[i]), rel=1e-4)
        assert np.abs(p.anomaly_map - amap[i, 0].numpy()).max() <= 1e-3 * float(amap.abs().max())
    assert got[0].score != got[1].score


def test_bad_shots_are_refused_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cat = make_demo_data(tmp_path / "d", n_train=3, n_test_good=1, n_test_defect=1, size=32, seed=0)
    assert main(["train", "--data", str(cat), "--out", str(tmp_path / "r"), "--shots", "0"]) != 0
    assert "shots" in capsys.readouterr().err
    assert main(["train", "--data", str(cat), "--out", str(tmp_path / "r"), "--shots", "5"]) != 0
    assert "only 3 good training images" in capsys.readouterr().err
