"""Issue 5's preprocessing/scoring parity: the exported bundle run by the runtime scores image files exactly as
training's evaluation path does (training.data preprocessing + torch model + the run's scoring).

Same image files, two code paths that share nothing but the files: training (cv2 decode -> training.data.preprocess
-> torch -> the run's scoring) and the runtime (cv2 decode -> runtime.preprocess.Preprocessor -> ONNX Runtime chain, and
the fused graph). Tolerance: image scores within 1e-4 relative to the peak score (observed ~1e-6), anomaly maps
within 1e-4 relative; verdicts identical except for scores within that band of the threshold.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.export.conftest import IMAGE_SIZE, build_tiny_bundle, build_tiny_run

TOL = 1e-4


@pytest.fixture(scope="module")
def run_and_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.getbasetemp()  # shared with tests/export: trained and exported once per session
    run, category = build_tiny_run(base)
    return run, category, build_tiny_bundle(base)


@pytest.mark.parametrize("fused", [False, True])
def test_runtime_scores_match_training_evaluation(run_and_bundle: tuple[Path, Path, Path], fused: bool) -> None:
    from runtime.config import BackendConfig
    from runtime.engine import AnomalyModel
    from training.backbones import get_spec
    from training.build import load_model
    from training.data import discover
    from training.evaluate import predict

    run, category, bundle = run_and_bundle
    from training.scoring import build_scoring

    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, size, cfg.model.sigma)  # the recipe the run chose
    samples = discover(category, cfg.data.val_fraction, cfg.seed, need_test=True).test
    ref = predict(model, scoring, samples, size, spec.mean, spec.std,
                  torch.device("cpu"), batch_size=4, keep_maps=True)  # fmt: skip
    assert ref.maps is not None
    with AnomalyModel(bundle, BackendConfig(kind="onnxruntime", threads=2, fused=fused)) as rt:
        preds = [rt.predict(cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)) for s in samples]
        threshold = rt.threshold
    scores = np.array([p.score for p in preds])
    maps = np.stack([p.anomaly_map for p in preds])
    peak = float(np.abs(ref.scores).max())
    assert np.abs(scores - ref.scores).max() <= TOL * peak
    assert np.abs(maps - ref.maps).max() <= TOL * float(np.abs(ref.maps).max())
    near = np.abs(ref.scores - threshold) <= TOL * peak
    assert ((scores >= threshold) == (ref.scores >= threshold))[~near].all()
