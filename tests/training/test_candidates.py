"""The default student choice (``model.projection: auto``): plain RD and RD++ trained, the higher signal kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.build import build_model
from training.candidates import AUTO_PROJECTIONS, CANDIDATES_DIR, _choose
from training.checkpoint import BEST, LAST, load_checkpoint
from training.config import load_train_config
from training.errors import CheckpointError, ConfigError
from training.evaluate import evaluate
from training.train import fit

from .conftest import FAST


def test_default_trains_both_students_and_keeps_the_higher_signal(tiny_run: Path) -> None:
    sel = json.loads((tiny_run / "selection.json").read_text())
    rec = sel["projection"]
    assert list(rec["candidates"]) == list(AUTO_PROJECTIONS) == ["identity", "rdpp"]
    signals = {p: r["best_signal"] for p, r in rec["candidates"].items()}
    assert all(0.0 <= s <= 1.0 for s in signals.values())
    assert rec["chosen"] == max(signals, key=lambda p: signals[p])
    for proj, row in rec["candidates"].items():
        own = json.loads((tiny_run / CANDIDATES_DIR / proj / "selection.json").read_text())
        assert row["best_signal"] == own["best_signal"] and row["best_step"] == own["best_step"]
        assert load_checkpoint(tiny_run / CANDIDATES_DIR / proj / BEST)["config"]["model"]["projection"] == proj
    best = load_checkpoint(tiny_run / BEST)
    winner = load_checkpoint(tiny_run / CANDIDATES_DIR / rec["chosen"] / BEST)
    # The run's checkpoint is the winner's, unchanged but for the choice written into its scoring info.
    assert best["config"] == winner["config"] and best["step"] == winner["step"]
    assert all(torch.equal(best["model"][k], winner["model"][k]) for k in winner["model"])
    assert best["scoring"]["info"]["projection"]["chosen"] == rec["chosen"]
    assert best["best_signal"] == signals[rec["chosen"]] == sel["best_signal"]
    assert json.loads((tiny_run / "config.json").read_text())["model"]["projection"] == rec["chosen"]
    assert not (tiny_run / LAST).exists(), "resuming goes through the candidates' own last checkpoints"


def test_the_chosen_student_exports_with_the_choice_in_the_manifest(tiny_run: Path, tmp_path: Path) -> None:
    from export.pipeline import ExportOptions, export_bundle
    from runtime.bundle import load_manifest

    export_bundle(ExportOptions(run=tiny_run, out=tmp_path / "bundle"))
    m = load_manifest(tmp_path / "bundle", verify=True)
    rec = json.loads((tiny_run / "selection.json").read_text())["projection"]
    assert m.extra["projection"] == m.extra["student.chosen"] == rec["chosen"]
    assert m.extra["student.signals"].startswith("identity 0.") and ", rdpp 0." in m.extra["student.signals"]
    assert "higher best validation signal" in str(m.extra["student.rule"])


def test_an_exact_tie_or_a_missing_signal_keeps_plain_rd() -> None:
    def rows(a: float | None, b: float | None) -> dict[str, dict[str, float | None]]:
        return {"identity": {"best_signal": a}, "rdpp": {"best_signal": b}}

    assert _choose(rows(0.9, 0.9)) == "identity"
    assert _choose(rows(0.9, 0.91)) == "rdpp"
    assert _choose(rows(None, 0.5)) == "rdpp" and _choose(rows(0.5, None)) == "identity"


def test_without_a_validation_split_only_plain_rd_trains(demo_category: Path, tmp_path: Path) -> None:
    cfg = load_train_config(None, {**FAST, "data.val_fraction": 0.0, "optim.steps": 2, "selection.density": False})
    assert fit(cfg, demo_category, tmp_path / "run", show_progress=False) == tmp_path / "run" / BEST
    assert sorted(p.name for p in (tmp_path / "run" / CANDIDATES_DIR).iterdir()) == ["identity"]
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["projection"]["chosen"] == "identity" and list(sel["projection"]["candidates"]) == ["identity"]
    assert load_checkpoint(tmp_path / "run" / BEST)["scoring"] is None  # the RD paper's scoring, as before
    assert evaluate(tmp_path / "run", demo_category, show_progress=False)["n_images"] == 18


def test_resume_continues_every_student_and_needs_a_started_run(demo_category: Path, tmp_path: Path) -> None:
    base = {**FAST, "selection.every_steps": 2, "selection.density": False}
    with pytest.raises(CheckpointError, match="no candidates/<student>/checkpoint_last.pt"):
        fit(load_train_config(None, {**base, "optim.steps": 2}), demo_category, tmp_path, resume=True)
    fit(load_train_config(None, {**base, "optim.steps": 2}), demo_category, tmp_path, show_progress=False)
    fit(load_train_config(None, {**base, "optim.steps": 4}), demo_category, tmp_path, resume=True, show_progress=False)
    for proj in AUTO_PROJECTIONS:
        last = load_checkpoint(tmp_path / CANDIDATES_DIR / proj / LAST)
        assert last["step"] == 4 and [h["step"] for h in last["history"]] == [2, 4]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["projection"], r["step"]) for r in log] == [("identity", 2), ("identity", 4), ("rdpp", 2), ("rdpp", 4)]


def test_auto_is_a_choice_not_a_model() -> None:
    with pytest.raises(ConfigError, match="'auto' names a choice among students"):
        build_model(load_train_config(None, {"data.image_size": 64, "model.pretrained": False}))
