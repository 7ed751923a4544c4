"""Training config: unknown keys rejected with the field path, CLI overrides, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_train_config
from training.errors import ConfigError


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.001\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: optim.momentum: Extra inputs are not permitted"):
        load_train_config(f)


def test_bad_value_names_field_and_value(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  image_size: -3\n")
    with pytest.raises(ConfigError, match=r"data.image_size.*-3"):
        load_train_config(f)
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_train_config(None, {"data.image_size": 100})


def test_defaults_follow_the_paper_and_overrides_win(tmp_path: Path) -> None:
    cfg = load_train_config(None)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.data.image_size) == (0.005, (0.5, 0.999), 256)
    # The budget of each student (RD and RD++ both train by default): batch 8, 500 steps.
    assert (cfg.optim.batch_size, cfg.optim.steps, cfg.model.projection) == (8, 500, "auto")
    assert load_train_config(None, {"model.objective": "rde"}).model.projection == "identity"
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  epochs: 5\n")
    cfg = load_train_config(f, {"optim.epochs": 2, "model.backbone": "resnet18", "seed": None})
    assert cfg.optim.epochs == 2 and cfg.model.backbone == "resnet18" and cfg.seed == 0


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "none.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(f)


def test_aspect_and_shape_are_validated_with_their_path(tmp_path: Path) -> None:
    assert load_train_config(None, {}).data.aspect == "auto"
    cfg = load_train_config(None, {"data.aspect": 2.5, "data.image_size": 128})
    assert cfg.data.aspect == 2.5 and cfg.data.input_hw() == (128, 128)  # resolved by training, not here
    assert load_train_config(None, {"data.shape": [192, 96]}).data.input_hw() == (192, 96)
    with pytest.raises(ConfigError, match=r"data\.aspect"):
        load_train_config(None, {"data.aspect": 40.0})
    with pytest.raises(ConfigError, match=r"data\.aspect"):
        load_train_config(None, {"data.aspect": "tall"})
    with pytest.raises(ConfigError, match=r"data\.shape: both sides must be multiples of 32"):
        load_train_config(None, {"data.shape": [100, 64]})
