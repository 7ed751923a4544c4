"""Training end to end on the demo data: selection.json, the best checkpoint's scoring, evaluation; data edge cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.training.conftest import FAST
from training.checkpoint import BEST, LAST, load_checkpoint
from training.config import load_train_config
from training.errors import ConfigError, DataError
from training.evaluate import evaluate, format_table
from training.scoring import PAPER_RECIPE, ScoreRecipe
from training.train import fit

#: a fit with no density head: the cheapest full run (12 candidates)
PLAIN = {**FAST, "selection.density": False, "model.projection": "identity"}  # one student, no density head


def _copy_best(run: Path, dst: Path) -> Path:
    """The best checkpoint alone in a fresh folder, so evaluate() writes metrics.json there, not in a shared run."""
    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(run / BEST, dst / BEST))


def test_fit_writes_selection_and_the_chosen_recipe(tiny_run: Path) -> None:
    sel = json.loads((tiny_run / "selection.json").read_text())
    assert sel["steps"] == 6 and [h["step"] for h in sel["history"]] == [3, 6]
    assert sel["paper_recipe"] == PAPER_RECIPE.name()
    cands = sel["candidates"]
    # the default density floor (0.5) keeps the density weights 0.5 and 0.75: 2 x 12 candidates
    assert len(cands) == 24 and all({"recipe", "image_auroc", "pixel_auroc", "signal"} <= set(c) for c in cands)
    assert all(" dens0.5" in c["recipe"] or " dens0.75" in c["recipe"] for c in cands)
    for c in cands:  # the default signal: the mean over synthetic defect kinds of (image + pixel AUROC) / 2
        per = c["per_kind"]
        assert set(per) <= {"texture", "cutpaste", "scratch", "spot"} and per
        want = sum(0.5 * (v["image_auroc"] + v["pixel_auroc"]) for v in per.values()) / len(per)
        assert c["signal"] == pytest.approx(want)
    chosen = ScoreRecipe.from_dict(sel["chosen"])
    first_best = max(cands, key=lambda c: c["signal"])  # max() keeps the first of equals, as the selector does
    assert chosen.name() == first_best["recipe"] and sel["best_signal"] == pytest.approx(first_best["signal"])
    best = load_checkpoint(tiny_run / BEST)
    assert best["step"] == sel["best_step"] and best["scoring"]["recipe"] == sel["chosen"]
    assert best["scoring"]["info"]["step"] == sel["best_step"]
    if chosen.uses_density:
        assert chosen.rd_norm != (0.0, 1.0) and "density" in best["scoring"]
    if chosen.standardize:
        assert "stats" in best["scoring"]


def test_evaluate_uses_the_chosen_recipe(tiny_run: Path, demo_category: Path, tmp_path: Path) -> None:
    ckpt = _copy_best(tiny_run, tmp_path / "run")
    m = evaluate(ckpt, demo_category, tmp_path / "report", show_progress=False)
    best = load_checkpoint(ckpt)
    assert m["recipe"] == ScoreRecipe.from_dict(best["scoring"]["recipe"]).name() and m["step"] == best["step"]
    assert m["n_images"] == 6 + 4 * 3 and set(m["per_defect"]) == {"crack", "missing", "scratch", "spot"}
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["at_validation_threshold"]["threshold"] == m["validation_threshold"]["value"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe"] == m["recipe"]
    assert (tmp_path / "report" / "index.html").is_file()


def test_pinned_paper_recipe_is_kept(demo_category: Path, tmp_path: Path) -> None:
    pin = {"selection.pin.weights": [1.0, 1.0, 1.0], "selection.pin.standardize": False}
    cfg = load_train_config(None, {**PLAIN, **pin, "selection.pin.reduction": "max", "optim.steps": 3})
    fit(cfg, demo_category, tmp_path, show_progress=False)
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert ScoreRecipe.from_dict(sel["chosen"]) == PAPER_RECIPE and len(sel["candidates"]) == 1


def test_no_validation_split_keeps_the_last_checkpoint_and_the_paper_scoring(
    demo_category: Path, tmp_path: Path
) -> None:
    cfg = load_train_config(None, {**PLAIN, "data.val_fraction": 0.0, "optim.steps": 3})
    assert fit(cfg, demo_category, tmp_path / "run", show_progress=False) == tmp_path / "run" / BEST
    best = load_checkpoint(tmp_path / "run" / BEST)
    assert best["step"] == 3 and best["scoring"] is None and best["split"]["val"] == []
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["best_signal"] is None and "chosen" not in sel
    m = evaluate(tmp_path / "run", demo_category, show_progress=False)
    assert m["recipe"] == PAPER_RECIPE.name() and "validation_threshold" not in m


def test_memmap_feature_cache_trains_the_same_model(demo_category: Path, tmp_path: Path) -> None:
    base = {**PLAIN, "optim.steps": 3}
    fit(load_train_config(None, base), demo_category, tmp_path / "ram", show_progress=False)
    fit(load_train_config(None, {**base, "data.cache_limit_mb": 1e-3}), demo_category, tmp_path / "disk", False)
    assert sorted(p.name for p in (tmp_path / "disk" / "cache").iterdir()) == ["f1.npy", "f2.npy", "f3.npy"]
    assert not (tmp_path / "ram" / "cache").exists()
    a, b = load_checkpoint(tmp_path / "ram" / LAST)["model"], load_checkpoint(tmp_path / "disk" / LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_category_without_ground_truth_trains_and_evaluates_with_image_labels_only(
    demo_category: Path, tmp_path: Path
) -> None:
    cat = tmp_path / "cat"
    shutil.copytree(demo_category, cat, ignore=shutil.ignore_patterns("ground_truth"))
    fit(load_train_config(None, {**PLAIN, "optim.steps": 3}), cat, tmp_path / "run", show_progress=False)
    m = evaluate(tmp_path / "run", cat, tmp_path / "report", show_progress=False)
    assert m["pixel_auroc"] is None and m["aupro"] is None
    assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["image_f1_max"] <= 1.0
    assert all("pixel_auroc" not in d and d["n"] == 3 for d in m["per_defect"].values())
    table = format_table(m).splitlines()
    assert table[1].startswith("overall") and table[1].split()[-2:] == ["n/a", "n/a"]
    assert all(line.split()[-2:] == ["n/a", "n/a"] for line in table[1:])
    assert (tmp_path / "report" / "index.html").is_file()


def test_mask_of_the_wrong_size_is_an_error_naming_it(tiny_run: Path, demo_category: Path, tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    shutil.copytree(demo_category, cat)
    bad = cat / "ground_truth" / "crack" / "001_mask.png"
    cv2.imwrite(str(bad), np.zeros((32, 48), np.uint8))
    with pytest.raises(DataError, match=r"ground_truth/crack/001_mask\.png is 48x32 but its image is 64x64"):
        evaluate(_copy_best(tiny_run, tmp_path / "run"), cat, show_progress=False)


def test_unsatisfiable_pin_is_a_config_error(demo_category: Path, tmp_path: Path) -> None:
    """Caught when the config is read, before any image is decoded, naming the field."""
    with pytest.raises(ConfigError, match=r"pin\.density_weight must be one of \[0\.0, 0\.25, 0\.5, 0\.75\]"):
        load_train_config(None, {**PLAIN, "selection.pin.density_weight": 0.3, "optim.steps": 1})
    with pytest.raises(ConfigError, match="needs density: true"):
        load_train_config(None, {"selection.density": False, "selection.pin.density_weight": 0.5})
    with pytest.raises(ConfigError, match="pin.weights must be one of"):
        load_train_config(None, {"selection.pin.weights": [1.0, 0.0, 0.0]})


def test_resolve_shape_keeps_the_parts_aspect(
    demo_category: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.train import resolve_shape

    tall = tmp_path / "tall"
    tall.mkdir()
    for i in range(6):
        cv2.imwrite(str(tall / f"{i:03d}.png"), np.full((512, 203 + i % 2), 100, np.uint8))
    with caplog.at_level("INFO", logger="training"):
        cfg = resolve_shape(load_train_config(None, {"data.image_size": 256}), tall)
    assert cfg.data.shape == (416, 160) and "height / width 2.5" in caplog.text
    assert resolve_shape(cfg, demo_category) is cfg  # a resolved shape is kept (resume, export)
    square = load_train_config(None, {"data.image_size": 128, "data.aspect": "square"})
    assert resolve_shape(square, tall).data.input_hw() == (128, 128)
    assert resolve_shape(load_train_config(None, {"data.image_size": 128}), demo_category).data.shape == (128, 128)
    wide = load_train_config(None, {"data.image_size": 128, "data.aspect": 0.5})
    assert resolve_shape(wide, demo_category).data.shape == (96, 192)
