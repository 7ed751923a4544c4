"""RD++: simplex noise deterministic by seed, pseudo-anomaly patches, Sinkhorn divergence, optimisers, loss terms."""

from __future__ import annotations

import pytest
import torch

from training.build import build_model
from training.config import parse_train_config
from training.objectives import RDPPObjective, sinkhorn_divergence
from training.simplex import PseudoAnomaly, octave_noise


def test_simplex_noise_is_deterministic_by_seed() -> None:
    a = octave_noise(4, 32, 32, 6, 0.6, generator=torch.Generator().manual_seed(3))
    b = octave_noise(4, 32, 32, 6, 0.6, generator=torch.Generator().manual_seed(3))
    c = octave_noise(4, 32, 32, 6, 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 3, 32, 32)
    assert a.abs().max() <= 1.0 and a.std() > 0.05  # octave sum normalised by its amplitudes


def test_simplex_noise_is_smooth() -> None:
    # coherent noise: neighbouring pixels correlate far more than white noise would
    n = octave_noise(2, 64, 64, 1, 0.6, generator=torch.Generator().manual_seed(0))
    d = (n[..., 1:] - n[..., :-1]).abs().mean()
    assert d < 0.25 * n.abs().mean()


@pytest.mark.parametrize("bank", [16, 0])
def test_pseudo_anomaly_patches(bank: int) -> None:
    pa = PseudoAnomaly(128, (10, 32), scale=0.2, bank=bank, seed=7)
    noise = pa(8)
    again = PseudoAnomaly(128, (10, 32), scale=0.2, bank=bank, seed=7)(8)
    assert torch.equal(noise, again)
    assert noise.shape == (8, 3, 128, 128) and noise.abs().max() <= 0.2 + 1e-6
    for img in noise:
        rows = img.abs().sum(dim=(0, 2)).nonzero()
        cols = img.abs().sum(dim=(0, 1)).nonzero()
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert 10 <= h <= 32 and 10 <= w <= 32 and rows.min() >= 1 and cols.min() >= 1


def test_sinkhorn_divergence() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g)
    same = sinkhorn_divergence(x, x[torch.randperm(8, generator=g)], blur=0.5, iters=100)
    assert abs(float(same)) < 1e-5  # a shuffled batch is the same point set
    far = sinkhorn_divergence(x, x + 2.0, blur=0.5, iters=100)
    assert float(far) == pytest.approx(0.5 * 4.0 * 5, rel=0.05)  # a translation by t costs |t|^2 / 2


def test_sinkhorn_matches_geomloss() -> None:
    geomloss = pytest.importorskip("geomloss")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g), torch.randn(12, 3, generator=g) + 0.5
    ref = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.99, debias=True)(x, y)
    assert float(sinkhorn_divergence(x, y, blur=0.5, iters=300)) == pytest.approx(float(ref), rel=0.02, abs=1e-3)


def test_rdpp_objective_optimisers_and_terms() -> None:
    cfg = parse_train_config({"data": {"image_size": 64}, "model": {"projection": "rdpp", "pretrained": False}})
    model = build_model(cfg).train()
    obj = RDPPObjective(cfg, model)
    dec, proj = obj.parameters_groups(model, cfg)
    assert dec.param_groups[0]["lr"] == 0.005 and proj.param_groups[0]["lr"] == 0.001
    assert {id(p) for p in proj.param_groups[0]["params"]} == {id(p) for p in model.projection.parameters()}
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        feats = model.teacher(images)
    loss, parts = obj.loss(model.student(), feats, images)
    assert set(parts) == {"kd", "ssot", "recon", "contrast", "noise_ms"}
    expected = parts["kd"] + 0.2 * (parts["ssot"] + 0.01 * parts["recon"] + 0.1 * parts["contrast"]) / 1.11
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert abs(parts["ssot"]) < 1e-4  # official SSOT compares a batch with its own shuffle: 0 by construction


def test_pseudo_anomaly_on_a_tall_input() -> None:
    noise = PseudoAnomaly((96, 32), (4, 40), bank=4, seed=0)(6)
    assert noise.shape == (6, 3, 96, 32)
    rows = (noise.abs().sum(1) > 0).any(2)  # (6, 96): rows a patch touched
    assert rows.any(1).all() and int(rows.sum(1).max()) <= 30  # the patch side is capped at the width - 2
