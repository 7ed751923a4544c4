"""RD-E (training/rde*.py): model contract per injection variant, losses, synthetic anomalies, the loop.

Tiny sizes (64 px, efficientnet_lite0; random weights where the numbers do not matter): seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import FAST
from training.backbones import build_teacher, get_spec
from training.config import load_train_config
from training.errors import ConfigError
from training.objective_config import RDEConfig
from training.rde import InjectionDecoder, RDEModel, make_expert, takes_teacher
from training.rde_loss import student_loss, teacher_loss
from training.rde_synth import PerlinAnomaly, perlin_2d
from training.rde_train import make_optimizers, train_step

SPEC = get_spec("efficientnet_lite0")
SIZE = 64


def _model(gii: str) -> tuple[RDEModel, torch.nn.Module]:
    torch.manual_seed(0)
    model = RDEModel(build_teacher("efficientnet_lite0", pretrained=False), SPEC, gii)  # type: ignore[arg-type]
    return model, make_expert(model.teacher)


@pytest.mark.parametrize("gii", ["gated", "ungated", "off"])
def test_every_trainable_parameter_gets_a_finite_gradient_and_the_expert_none(gii: str) -> None:
    model, expert = _model(gii)
    cfg = load_train_config(None, {"model.objective": "rde", "extra.rde.gii": gii})
    optimizers = make_optimizers(model, cfg)
    anomaly = PerlinAnomaly(SIZE, SPEC.mean, SPEC.std, RDEConfig(), seed=0)
    x = torch.randn(4, 3, SIZE, SIZE)
    loss, parts = train_step(model, expert, model.student(), optimizers, x, anomaly)
    assert torch.isfinite(torch.tensor(loss))
    assert set(parts) >= {"teacher", "student", "t_normal", "t_mask", "t_global", "s_teacher", "s_expert"}
    named = list(model.named_parameters())
    assert named and all(p.requires_grad for _, p in named)  # teacher and student both train
    no_grad = [n for n, p in named if p.grad is None]
    assert not no_grad, no_grad[:5]
    assert all(torch.isfinite(p.grad).all() for _, p in named if p.grad is not None)
    assert all(p.grad is None and not p.requires_grad for p in expert.parameters())
    has_gii = any(n.startswith("decoder.gii") for n, _ in named)
    assert has_gii == (gii != "off") == takes_teacher(model.decoder)


@pytest.mark.parametrize("gii", ["gated", "ungated", "off"])
def test_student_maps_have_the_teacher_shapes(gii: str) -> None:
    model, _ = _model(gii)
    model.eval()
    with torch.no_grad():
        feats, recon = model(torch.randn(2, 3, SIZE, SIZE))
    assert [r.shape for r in recon] == [f.shape for f in feats]
    assert isinstance(model.decoder, InjectionDecoder) == (gii != "off")


def test_gate_weights_decoder_against_teacher_by_cosine() -> None:
    """Gated with d == t (cos 1): the mix is the teacher branch alone; the ungated block adds both."""
    model, _ = _model("gated")
    block = model.decoder.gii2.eval()  # type: ignore[union-attr]
    t = torch.randn(1, 40, 8, 8)
    t_prev = torch.randn(1, 24, 16, 16)
    with torch.no_grad():
        f_t = block.teacher_fuse(t + block.lateral(torch.nn.functional.avg_pool2d(t_prev, 2)))
        want = block.merge(torch.cat([t, block.inject(f_t)], dim=1))
        assert torch.allclose(block(t, t, t_prev), want, atol=1e-5)
        block.gated = False
        assert not torch.allclose(block(t, t, t_prev), want, atol=1e-3)


def test_expert_stays_the_imagenet_teacher_while_the_teacher_moves() -> None:
    model, expert = _model("gated")
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    t_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    cfg = load_train_config(None, {"model.objective": "rde"})
    optimizers = make_optimizers(model, cfg)
    anomaly = PerlinAnomaly(SIZE, SPEC.mean, SPEC.std, RDEConfig(), seed=1)
    for _ in range(2):
        train_step(model, expert, model.student(), optimizers, torch.randn(4, 3, SIZE, SIZE), anomaly)
    assert all(torch.equal(before[k], v) for k, v in expert.state_dict().items())
    assert not all(torch.equal(t_before[k], v) for k, v in model.teacher.state_dict().items())
    assert not any(k.startswith("expert") for k in model.state_dict())


def test_losses_vanish_at_their_targets() -> None:
    feats = [torch.randn(2, c, s, s) for c, s in zip(SPEC.channels, (16, 8, 4), strict=True)]
    zero_mask = torch.zeros(2, 1, SIZE, SIZE)
    lt, _ = teacher_loss(feats, feats, feats, feats, zero_mask)
    ls, _ = student_loss(feats, feats, feats, feats)
    assert float(lt) == pytest.approx(0.0, abs=1e-5) and float(ls) == pytest.approx(0.0, abs=1e-5)
    # the teacher must move away from the expert where the mask is: full mask, T(x~) == E(x) -> L1 = 1 per scale
    lt_full, parts = teacher_loss(feats, feats, feats, feats, torch.ones(2, 1, SIZE, SIZE))
    assert parts["t_mask"] == pytest.approx(3.0, abs=1e-5) and float(lt_full) == pytest.approx(3.0, abs=1e-5)


def test_perlin_anomaly_changes_only_the_masked_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    noise = perlin_2d(SIZE, SIZE, (4, 8), g)
    assert noise.shape == (SIZE, SIZE) and noise.abs().max() <= 1.5 and noise.std() > 0.05
    anomaly = PerlinAnomaly(SIZE, SPEC.mean, SPEC.std, RDEConfig(), seed=0)
    x = torch.randn(6, 3, SIZE, SIZE)
    x_t, m = anomaly(x)
    assert m.shape == (6, 1, SIZE, SIZE) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.flatten(1).sum(1) > 0).all()  # every sample gets an anomaly
    assert torch.equal(x_t * (1 - m), x * (1 - m))
    assert not torch.equal(x_t, x)


def test_fit_writes_an_exportable_checkpoint_without_the_expert(demo_category: Path, tmp_path: Path) -> None:
    from training.build import load_model
    from training.checkpoint import load_checkpoint
    from training.train import fit

    cfg = load_train_config(None, {**FAST, "model.objective": "rde", "optim.steps": 4, "selection.every_steps": 2})
    best = fit(cfg, demo_category, tmp_path, show_progress=False)
    ckpt = load_checkpoint(best)
    assert ckpt["scoring"] is not None and ckpt["step"] in (2, 4)
    assert any(k.startswith("decoder.gii3.") for k in ckpt["model"])
    assert not any("expert" in k for k in ckpt["model"])
    assert set(ckpt["aux"]) == {"expert"}  # training-only, for --resume
    assert len(ckpt["optimizer"]) == 2
    model, loaded_cfg, _ = load_model(tmp_path)
    assert isinstance(model, RDEModel) and loaded_cfg.extra.rde.gii == "gated"
    summary = json.loads((tmp_path / "selection.json").read_text())
    assert summary["objective"] == "rde" and summary["steps"] == 4 and len(summary["history"]) == 2
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("signal" in r and "teacher" in r and "student" in r for r in log)


def test_resume_continues_from_the_last_step(demo_category: Path, tmp_path: Path) -> None:
    from training.checkpoint import LAST, load_checkpoint
    from training.train import fit

    over = {**FAST, "model.objective": "rde", "extra.rde.gii": "ungated", "selection.every_steps": 2}
    fit(load_train_config(None, {**over, "optim.steps": 2}), demo_category, tmp_path, show_progress=False)
    first = load_checkpoint(tmp_path / LAST)
    fit(load_train_config(None, {**over, "optim.steps": 4}), demo_category, tmp_path, resume=True,
        show_progress=False)  # fmt: skip
    second = load_checkpoint(tmp_path / LAST)
    assert second["step"] == 4 and len(second["history"]) == 2
    assert all(torch.equal(first["aux"]["expert"][k], v) for k, v in second["aux"]["expert"].items())


def test_config_and_cli_errors() -> None:
    from training.cli import train_command, train_parser

    with pytest.raises(ConfigError, match="model.projection"):
        load_train_config(None, {"model.objective": "rde", "model.projection": "rdpp"})
    with pytest.raises(ConfigError, match="extra.rde.gii"):
        load_train_config(None, {"model.objective": "rde", "extra.rde.gii": "sideways"})
    args = train_parser().parse_args(["--data", "x", "--out", "y", "--gii", "gated"])
    with pytest.raises(ConfigError, match="--objective rde"):
        train_command(args)
    helptext = train_parser().format_help()
    assert "--objective {rd,rde}" in helptext and "--gii {gated,ungated,off}" in helptext


def test_perlin_anomaly_on_a_tall_input() -> None:
    spec = get_spec("efficientnet_lite0")
    make = PerlinAnomaly((96, 32), spec.mean, spec.std, RDEConfig(), seed=0)
    x = torch.zeros(3, 3, 96, 32)
    x_t, masks = make(x)
    assert x_t.shape == x.shape and masks.shape == (3, 1, 96, 32) and float(masks.sum()) > 0
