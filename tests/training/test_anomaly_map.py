"""Anomaly map and score on small hand-computed cases, and the blur against scipy."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from training.anomaly_map import AnomalyScorer, gaussian_kernel1d
from training.loss import flattened_cosine_loss


def _feats(c: int = 4, b: int = 1) -> list[torch.Tensor]:
    return [torch.rand(b, c, 8, 8) + 0.1, torch.rand(b, c, 4, 4) + 0.1, torch.rand(b, c, 2, 2) + 0.1]


def test_identical_features_give_zero_map_and_score() -> None:
    f = _feats()
    amap, score = AnomalyScorer((32, 32))(*f, *[t * 3.0 for t in f])  # cosine ignores scale
    assert amap.shape == (1, 1, 32, 32)
    assert torch.allclose(amap, torch.zeros_like(amap), atol=1e-6)
    assert float(score[0]) < 1e-6


def test_orthogonal_features_give_one_per_scale() -> None:
    """Teacher along channel 0, student along channel 1 everywhere: 1 - cos = 1 at each of 3 scales -> map == 3."""
    shapes = [(8, 8), (4, 4), (2, 2)]
    f = [torch.zeros(1, 2, *s) for s in shapes]
    d = [torch.zeros(1, 2, *s) for s in shapes]
    for t in f:
        t[:, 0] = 1.0
    for t in d:
        t[:, 1] = 1.0
    amap, score = AnomalyScorer((16, 16))(*f, *d)
    assert torch.allclose(amap, torch.full_like(amap, 3.0), atol=1e-5)  # blur of a constant is the constant
    assert abs(float(score[0]) - 3.0) < 1e-5


def test_single_anomalous_cell_is_where_the_max_is() -> None:
    shapes = [(8, 8), (4, 4), (2, 2)]
    f = [torch.ones(1, 2, *s) for s in shapes]
    d = [t.clone() for t in f]
    d[0][0, :, 6, 1] = torch.tensor([1.0, -1.0])  # orthogonal at one stride-4 cell: 1 - cos = 1 there
    amap, score = AnomalyScorer((29, 29), sigma=0)(*f, *d)
    # unblurred, 8 -> 29 px with align_corners=True: cell k lands exactly on pixel 4k
    y, x = np.unravel_index(int(amap[0, 0].argmax()), (29, 29))
    assert (y, x) == (24, 4)
    assert abs(float(score[0]) - 1.0) < 1e-6


def test_blur_matches_scipy_gaussian_filter_sigma4() -> None:
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33 and abs(float(k.sum()) - 1) < 1e-6
    rng = np.random.default_rng(0)
    for n in (64, 24):
        raw = rng.random((n, n)).astype(np.float32)
        # feed the raw map through the scorer as a single scale: f = [1, 0], d = [cos t, sin t] gives 1 - cos = raw
        theta = np.arccos(1 - raw)
        f = torch.zeros(1, 2, n, n)
        f[:, 0] = 1
        d = torch.from_numpy(np.stack([np.cos(theta), np.sin(theta)])[None]).float()
        z = [torch.ones(1, 2, 1, 1)] * 2
        amap, score = AnomalyScorer((n, n))(f, z[0], z[1], d, z[0], z[1])
        ref = gaussian_filter(raw.astype(np.float64), sigma=4)
        assert np.abs(amap[0, 0].numpy() - ref).max() < 1e-4
        assert abs(float(score[0]) - ref.max()) < 1e-4


def test_flattened_cosine_loss_hand_case() -> None:
    t = [torch.tensor([[1.0, 0.0, 0.0, 0.0]]).view(1, 1, 2, 2)]
    s = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 1, 2, 2)]
    # cos = 1 / sqrt(2) over the flattened vector
    assert abs(float(flattened_cosine_loss(t, s)) - (1 - 2**-0.5)) < 1e-6
    # two scales add up; batch is averaged
    t2 = [torch.cat([t[0], t[0]]), torch.ones(2, 3, 1, 1)]
    s2 = [torch.cat([s[0], t[0]]), torch.ones(2, 3, 1, 1)]
    assert abs(float(flattened_cosine_loss(t2, s2)) - (1 - 2**-0.5) / 2) < 1e-6
