"""The supervised baseline (seed 002): class weights, BatchNorm kept frozen, a fit that learns a separable task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.supervised import SupervisedCNN, SupervisedOptions, class_weights, fit_supervised, predict_proba


def test_class_weights_balance_the_classes() -> None:
    w = class_weights(np.array([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    with pytest.raises(ValueError, match="both classes"):
        class_weights(np.array([0, 0]))


def test_train_mode_keeps_batchnorm_statistics() -> None:
    model = SupervisedCNN(pretrained=False).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns) and model.head.training
    assert all(p.requires_grad for p in model.parameters())


def test_fit_learns_bright_vs_dark() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (8, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    x[y == 1] += 1.0  # defects are brighter
    model = fit_supervised(x, y, SupervisedOptions(epochs=15, batch_size=8, lr=1e-3), pretrained=False)
    p = predict_proba(model, x)
    assert p.shape == (8,) and p[y == 1].min() > p[y == 0].max()
