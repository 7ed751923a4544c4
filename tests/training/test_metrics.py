"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from training.metrics import aupro, auroc, f1_max


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_f1_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(400) < 0.3
    s = np.round(rng.normal(size=400) + y, 1)  # rounding makes ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert f1_max(s, y)[0] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-12)), abs=1e-12)


def test_auroc_hand_case_and_single_class() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_aupro_perfect_and_hand_computed() -> None:
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # one region of 4 px
    masks[1, 3, 3] = True  # one region of 1 px
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0)

    # Region A scores 1.0; region B scores 0.5 like 6 of the 27 normal pixels; other normals 0.
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, :2, :2] = 1.0
    maps[1, 3, 3] = 0.5
    normal_idx = np.argwhere(~masks)[:6]
    for i, y, x in normal_idx:
        maps[i, y, x] = 0.5
    # thresholds: 1.0 -> FPR 0, PRO 0.5; 0.5 -> FPR 6/27, PRO 1.0; then flat at PRO 1 up to FPR 0.3.
    f1 = 6 / 27
    area = 0.5 * (0.5 + 1.0) * f1 + 1.0 * (0.3 - f1)  # PRO jumps from 0.5 to 1 linearly between FPR 0 and 6/27
    area0 = 0.0  # from (0, 0) to (0, 0.5): zero width
    assert aupro(maps, masks) == pytest.approx((area + area0) / 0.3, abs=1e-9)


def test_aupro_random_scores_are_low() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 10:20, 10:20] = True
    assert aupro(rng.random(masks.shape).astype(np.float32), masks) < 0.3
