"""Checkpoints: plain dicts loaded with weights_only=True, exact score round trip, clear errors, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.conftest import FAST
from training.backbones import get_spec
from training.build import load_model
from training.checkpoint import BEST, LAST, load_checkpoint
from training.config import load_train_config
from training.data import ImageDataset, discover
from training.errors import CheckpointError, ConfigError
from training.scoring import build_scoring
from training.train import fit


def _scores(run: Path, category: Path) -> np.ndarray:
    model, cfg, ckpt = load_model(run)
    spec = get_spec(cfg.model.backbone)
    size = (cfg.data.image_size,) * 2
    ds = ImageDataset(discover(category, need_test=True).test, size, spec.mean, spec.std, skip_unreadable=False)
    x = torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))]))
    with torch.no_grad():
        feats, recon = model(x)
        return build_scoring(ckpt["scoring"], spec.channels, size, cfg.model.sigma)(feats, recon)[1].numpy()


def test_checkpoint_is_a_plain_dict_with_config_and_seed(tiny_run: Path) -> None:
    ckpt = torch.load(tiny_run / BEST, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "rdedge-checkpoint" and ckpt["version"] == 2 and ckpt["seed"] == 0
    assert ckpt["config"]["model"]["backbone"] == "efficientnet_lite0"
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    assert ckpt["aux"] is None
    assert ckpt["split"]["val"], "the validation file list is kept for threshold calibration"
    # The default trains plain RD and RD++; the run's checkpoint is the winner's, with its concrete projection.
    chosen = json.loads((tiny_run / "selection.json").read_text())["projection"]["chosen"]
    assert ckpt["config"]["model"]["projection"] == chosen in ("identity", "rdpp")
    tagged = [json.loads(x) for x in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["projection"] for r in tagged] == ["identity"] * 2 + ["rdpp"] * 2
    log = [r for r in tagged if r["projection"] == chosen]
    assert [r["step"] for r in log] == [3, 6] and all("val_loss" in r and "images_per_s" in r for r in log)
    assert all(0.0 <= r["signal"] <= 1.0 and r["recipe"] for r in log)
    assert ckpt["step"] == ckpt["best_step"] in (3, 6) and ckpt["best_signal"] == max(r["signal"] for r in log)
    assert ckpt["scoring"]["recipe"] and [h["step"] for h in ckpt["history"]] == [3, 6][: len(ckpt["history"])]
    last = torch.load(tiny_run / "candidates" / chosen / LAST, map_location="cpu", weights_only=True)
    assert last["step"] == 6 and last["scoring"] is None and [h["step"] for h in last["history"]] == [3, 6]


def test_round_trip_reproduces_scores_exactly(tiny_run: Path, demo_category: Path) -> None:
    a = _scores(tiny_run, demo_category)
    b = _scores(tiny_run / BEST, demo_category)
    assert a.shape == (len(discover(demo_category, need_test=True).test),)
    np.testing.assert_array_equal(a, b)


def test_foreign_and_missing_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint_best.pt or checkpoint_last.pt"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an rdedge checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_wrong_architecture_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(tiny_run / BEST)
    ckpt["config"]["model"]["backbone"] = "resnet18"
    torch.save(ckpt, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="does not fit the resnet18 architecture"):
        load_model(tmp_path / "mixed.pt")


def test_resume_continues_from_the_saved_step_and_refuses_a_changed_model(demo_category: Path, tmp_path: Path) -> None:
    base = {**FAST, "selection.every_steps": 2, "selection.density": False, "model.projection": "identity"}
    fit(load_train_config(None, {**base, "optim.steps": 4}), demo_category, tmp_path / "a", show_progress=False)
    assert load_checkpoint(tmp_path / "a" / LAST)["step"] == 4
    changed = load_train_config(None, {**base, "optim.steps": 8, "data.image_size": 96})
    with pytest.raises(ConfigError, match="data.image_size"):
        fit(changed, demo_category, tmp_path / "a", resume=True, show_progress=False)
    longer = load_train_config(None, {**base, "optim.steps": 8})  # more steps is what resume is for
    fit(longer, demo_category, tmp_path / "a", resume=True, show_progress=False)
    last = load_checkpoint(tmp_path / "a" / LAST)
    assert last["step"] == 8 and [h["step"] for h in last["history"]] == [2, 4, 6, 8]
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    # The resumed run is the uninterrupted one: same weights, optimiser state and batches after step 4.
    fit(longer, demo_category, tmp_path / "b", show_progress=False)
    straight = load_checkpoint(tmp_path / "b" / LAST)
    for k, v in straight["model"].items():
        torch.testing.assert_close(last["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert [h["signal"] for h in straight["history"]] == pytest.approx([h["signal"] for h in last["history"]])


def test_resume_without_a_checkpoint_is_an_error(demo_category: Path, tmp_path: Path) -> None:
    cfg = load_train_config(None, {**FAST, "optim.steps": 2, "model.projection": "identity"})
    with pytest.raises(CheckpointError, match="no checkpoint_last.pt"):
        fit(cfg, demo_category, tmp_path, resume=True, show_progress=False)
