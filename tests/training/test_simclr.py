"""SimCLR: NT-Xent against hand-computed values, trainable backbone copies, checkpoint round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.augment import POLICIES
from training.errors import CheckpointError
from training.simclr import (
    SimCLRConfig,
    SimCLRNet,
    build_trainable_backbone,
    load_aux_backbone,
    load_simclr,
    nt_xent,
    save_simclr,
)


def test_nt_xent_aligned_pairs() -> None:
    # z = [e1, e2, e1, e2], tau 1: each row's positive has cos 1, the other two candidates cos 0.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, acc = nt_xent(z1, z1.clone(), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert acc.item() == 1.0


def test_nt_xent_crossed_pairs() -> None:
    # z = [e1, e2, e2, e1], tau 0.5: the positive has cos 0, one negative cos 1 -> logits (0, 0, 2), loss log(2 + e^2).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # scale must not matter
    loss, acc = nt_xent(z1, z2, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(2 + math.e**2), abs=1e-6)
    assert acc.item() == 0.0


def test_nt_xent_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        num = math.exp(float(z[i] @ z[pos]) / 0.3)
        den = sum(math.exp(float(z[i] @ z[j]) / 0.3) for j in range(10) if j != i)
        total += -math.log(num / den)
    loss, _ = nt_xent(z1, z2, 0.3)
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)


def test_trainable_backbone_is_not_frozen() -> None:
    net = build_trainable_backbone("efficientnet_lite0", "scratch")
    assert net.training
    assert all(p.requires_grad for p in net.parameters())
    model = SimCLRNet(net, (24, 40, 112), head_dim=16)
    out = model(torch.randn(4, 3, 64, 64))
    assert out.shape == (4, 16)
    loss, _ = nt_xent(out[:2], out[2:], 0.5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_checkpoint_round_trip_gives_frozen_aux(tmp_path: Path) -> None:
    cfg = SimCLRConfig(init="scratch", image_size=64)
    net = SimCLRNet(build_trainable_backbone(cfg.backbone, cfg.init), (24, 40, 112), cfg.head_dim)
    save_simclr(tmp_path / "simclr.pt", cfg, net, 0, [], POLICIES["default"])
    ckpt = load_simclr(tmp_path)
    assert ckpt["format"] == "rdedge-simclr" and ckpt["init"] == "scratch" and ckpt["backbone"] == cfg.backbone
    aux, name = load_aux_backbone(tmp_path)
    assert name == "efficientnet_lite0" and not aux.training
    assert not any(p.requires_grad for p in aux.parameters())
    x = torch.randn(1, 3, 64, 64)
    net.backbone.eval()
    for a, b in zip(aux(x), net.backbone(x), strict=True):
        torch.testing.assert_close(a, b)


def test_missing_or_foreign_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="rdedge pretrain"):
        load_simclr(tmp_path)
    torch.save({"format": "something-else"}, tmp_path / "simclr.pt")
    with pytest.raises(CheckpointError, match="not an rdedge SimCLR checkpoint"):
        load_simclr(tmp_path)
