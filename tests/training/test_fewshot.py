"""Few-shot mode (seed 001): the contrastive loss, fitting on K images, the K-image threshold rules, the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.fewshot import EmbeddingGaussian, FewShotConfig, contrastive_loss, fit_fewshot
from training.simclr import nt_xent


def _images(k: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0.2, 0.8, size).view(1, 1, 1, size).expand(k, 3, size, size)
    return (base + 0.05 * torch.rand(k, 3, size, size, generator=g)).clamp(0, 1).contiguous()


def test_contrastive_loss_reduces_to_nt_xent_without_cross_pairs() -> None:
    z1, z2 = torch.randn(4, 16), torch.randn(4, 16)
    inst = torch.arange(4).repeat(2)
    got = contrastive_loss(torch.cat([z1, z2]), inst, 0.5, cross_weight=0.0)
    assert float(got) == pytest.approx(float(nt_xent(z1, z2, 0.5)[0]), rel=1e-5)


def test_cross_pairs_and_negatives_change_the_loss_and_give_gradients() -> None:
    z = torch.randn(6, 8, requires_grad=True)
    neg = torch.randn(3, 8, requires_grad=True)
    inst = torch.tensor([0, 1, 2, 0, 1, 2])
    a = contrastive_loss(z, inst, 0.2, 0.0)
    b = contrastive_loss(z, inst, 0.2, 1.0, neg)
    assert float(a.detach()) != float(b.detach())
    b.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and neg.grad is not None and neg.grad.abs().sum() > 0


def test_embedding_gaussian_scores_far_points_higher() -> None:
    rng = np.random.default_rng(0)
    f = [torch.from_numpy(rng.normal(1, 0.05, (20, c, 2, 2))).float() for c in (3, 4, 5)]
    g = EmbeddingGaussian(12).fit(EmbeddingGaussian.embed(*f))
    far = [x.clone() for x in f]
    far[0][:, 0] += 3.0
    assert float(g(*far).mean()) > 3 * float(g(*f).mean())


@pytest.mark.parametrize(("k", "negatives"), [(2, "none"), (1, "synth")])
def test_fit_fewshot_outputs_and_threshold_rule(k: int, negatives: str) -> None:
    torch.set_num_threads(2)
    cfg = FewShotConfig(shots=k, image_size=32, steps=2, batch=2, fit_views=3, density_dims=8, negatives=negatives)
    before = {
        n: p.clone()
        for n, p in __import__("training.backbones", fromlist=["x"]).build_teacher(cfg.backbone).state_dict().items()
    }
    res = fit_fewshot(_images(k, 32), cfg)
    assert len(res.log) == 2 and all(np.isfinite(r["loss"]) for r in res.log)
    changed = [
        n
        for n, p in res.model.trunk.state_dict().items()
        if p.dtype.is_floating_point and not torch.equal(p, before[n])
    ]
    assert changed  # the teacher was fine-tuned
    assert ("leave-one-out" if k >= 2 else "augmentation") in res.threshold_rule
    assert len(res.threshold_scores) == (k if k >= 2 else 16) and np.isfinite(res.threshold)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        amap, score = res.model(x)
    assert amap.shape == (2, 1, 32, 32) and score.shape == (2,)
    assert torch.isfinite(amap).all() and torch.isfinite(score).all()


def test_one_shot_without_negatives_keeps_the_teacher_and_wrong_count_refused() -> None:
    cfg = FewShotConfig(shots=1, image_size=32, steps=5, fit_views=2, density_dims=8)
    res = fit_fewshot(_images(1, 32), cfg)
    assert res.log == []
    with pytest.raises(ValueError, match="expected 1 images"):
        fit_fewshot(_images(2, 32), cfg)
