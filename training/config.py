"""Training configuration: pydantic v2 from YAML, unknown keys rejected, errors name the field path.

The validated config is stored in every checkpoint, so any tool can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.errors import ConfigError
from training.objective_config import ExtraConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: An input aspect setting: ``auto``, ``square`` or a height / width ratio (training and few-shot share it).
Aspect = Literal["auto", "square"] | Annotated[float, Field(ge=0.1, le=10.0)]


def input_hw(side: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    """The model's input ``(height, width)``: a resolved ``shape``, else the square ``side``."""
    return (int(shape[0]), int(shape[1])) if shape else (side, side)


class DataConfig(_Strict):
    image_size: int = Field(
        256,
        ge=32,
        le=2048,
        description="input side in pixels (multiple of 32); for parts of another aspect the input keeps about "
        "image_size^2 pixels (see aspect)",
    )
    aspect: Aspect = Field(
        "auto",
        description="input height / width: auto (the training images' own when they share one, else square) | "
        "square | a number (e.g. 2.5 for parts 2.5 times taller than wide)",
    )
    shape: tuple[int, int] | None = Field(
        None,
        description="the input (height, width) training resolved from image_size and aspect; written by training "
        "into the run's config, leave it unset",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of train/good kept aside for validation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    max_images: int | None = Field(
        None,
        ge=2,
        description="use at most this many train/good images, chosen evenly from the sorted list (the rest only help "
        "set the threshold)",
    )
    cache_limit_mb: float = Field(
        2048.0, gt=0, description="teacher features cached in RAM up to this size, in memmap files in the run past it"
    )

    def input_hw(self) -> tuple[int, int]:
        """The model's input ``(height, width)``: the resolved ``shape``, else the square ``image_size``."""
        return input_hw(self.image_size, self.shape)


class ModelConfig(_Strict):
    backbone: str = Field("efficientnet_lite0", description="teacher: wide_resnet50_2 | resnet18 | efficientnet_lite0")
    teacher_weights: str | None = Field(None, description="local teacher state_dict (offline boxes)")
    pretrained: bool = Field(True, description="ImageNet teacher weights (False only for tests)")
    projection: Literal["auto", "identity", "aux", "rdpp"] = Field(
        "auto",
        description="auto (train plain RD and RD++, keep the one the validation signal rates higher) | identity "
        "(plain RD) | aux (SimCLR-aligned heads) | rdpp (RD++ projection)",
    )
    objective: Literal["rd", "rde"] = Field(
        "rd", description="rd (frozen teacher, student on cached features) | rde (RD-E: expert, tuned teacher, GII)"
    )
    sigma: float = Field(4.0, ge=0.0, description="Gaussian blur sigma of the anomaly map in pixels")
    signed_decoder: bool | None = Field(
        None, description="decoder stage outputs without ReLU (default: when the teacher's features are signed)"
    )

    @model_validator(mode="after")
    def _auto_is_rd_only(self) -> ModelConfig:
        if self.objective == "rde" and self.projection == "auto":
            self.projection = "identity"  # RD-E has its own student; 'auto' chooses among RD students only
        return self


class OptimConfig(_Strict):
    lr: float = Field(0.005, gt=0, description="Adam learning rate (RD: 0.005)")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas (RD: 0.5, 0.999)")
    batch_size: int = Field(8, ge=1, description="images per step")
    steps: int = Field(500, ge=1, description="optimiser steps (ignored when epochs is set)")
    epochs: int | None = Field(None, ge=1, description="passes over train/good; overrides steps when set")
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time (at the next evaluation)")


class PinConfig(_Strict):
    """Scoring settings fixed by the user instead of chosen by the validation signal (``None``: choose)."""

    weights: tuple[float, float, float] | None = Field(None, description="weights of the stride 4/8/16 maps")
    standardize: bool | None = Field(None, description="compare per-channel standardised features")
    reduction: Literal["max", "topk"] | None = Field(None, description="image score: max or top-1% mean")
    density_weight: float | None = Field(None, ge=0.0, lt=1.0, description="share of the density map (0: RD only)")


#: What the selection can choose from (training/selection.py keeps its candidate grid in step with these).
SCALE_SETS = ((1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (0.0, 0.0, 1.0))
DENSITY_WEIGHTS = (0.0, 0.25, 0.5, 0.75)


class SelectionConfig(_Strict):
    """Checkpoint and scoring choice by synthetic defects on the held-out good images (never the test set)."""

    every_steps: int = Field(100, ge=1, description="evaluate the validation signal every N steps (and at the end)")
    synthetic_per_image: int = Field(3, ge=1, le=20, description="synthetic defects made from each validation image")
    density: bool = Field(True, description="fit the per-position Gaussian density head (fusion candidates)")
    density_dims: int = Field(64, ge=4, le=1024, description="PCA dimensions of the density head")
    knn_coreset: float = Field(
        0.01,
        ge=0.0,
        le=0.2,
        description="memory bank of the density head's kNN map as a fraction of the training patches (PatchCore's "
        "coreset ratio; the peers use 0.01); the validation signal decides whether the map is blended in "
        "(kNN share 0 or 0.5); 0: the Gaussian alone, no bank",
    )
    density_aggregate: int = Field(
        3,
        ge=0,
        le=9,
        description="window of the density head's wide Gaussian candidate: a second per-position Gaussian on the "
        "teacher maps averaged over k x k (PatchCore's local aggregation), blended in at share 0.5 only if the "
        "validation signal gains more than one bootstrap standard error from it; an odd window, or 0: no candidate",
    )
    centre: Literal["auto", "on", "off"] = Field(
        "auto",
        description="subtract each image's own median from its anomaly map; auto: only when the density map's "
        "validation signal gains more than one bootstrap standard error from it (decided before training)",
    )
    signal: Literal["per_kind", "pooled"] = Field(
        "per_kind",
        description="per_kind: mean over synthetic defect kinds of (image AUROC + pixel AUROC) / 2, so thin scratches "
        "count as much as large blobs; pooled: one image and one pixel AUROC over all synthetic defects",
    )
    tie_break: Literal["density", "none"] = Field(
        "density",
        description="density: among the candidates the signal cannot tell from the best (within one bootstrap "
        "standard error of the paired difference), take the one with the largest density weight; none: the best "
        "signal, whatever its margin",
    )
    bootstrap: int = Field(
        30, ge=2, le=1000, description="resamples of the validation images for the tie band (tie_break: density)"
    )
    density_floor: float = Field(
        0.5,
        ge=0.0,
        le=max(DENSITY_WEIGHTS),
        description="smallest density weight a candidate may have when the density head is fitted (0: every "
        "weight, RD alone included); a pinned density_weight overrides it",
    )
    pin: PinConfig = Field(default_factory=PinConfig, description="scoring settings fixed instead of chosen")

    @field_validator("density_aggregate")
    @classmethod
    def _odd_window(cls, v: int) -> int:
        if v and v % 2 == 0:
            raise ValueError(f"must be 0 or an odd window, got {v}")
        return v

    @model_validator(mode="after")
    def _pin_is_a_candidate(self) -> SelectionConfig:
        pin = self.pin
        if pin.weights is not None and tuple(float(w) for w in pin.weights) not in SCALE_SETS:
            raise ValueError(f"pin.weights must be one of {[list(w) for w in SCALE_SETS]} (got {list(pin.weights)})")
        if pin.density_weight is not None:
            if pin.density_weight not in DENSITY_WEIGHTS:
                raise ValueError(
                    f"pin.density_weight must be one of {list(DENSITY_WEIGHTS)} (got {pin.density_weight})"
                )
            if pin.density_weight > 0 and not self.density:
                raise ValueError("pin.density_weight > 0 needs density: true (the density head)")
        return self


class TrainConfig(_Strict):
    """Top-level training config (``rdedge train --config FILE``)."""

    seed: int = Field(0, description="seeds the split, init and shuffling")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu or cuda")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="checkpoint and scoring choice")
    extra: ExtraConfig = Field(default_factory=ExtraConfig, description="settings of the auxiliary / RD++ objectives")


def format_errors(exc: ValidationError, source: str) -> str:
    return "\n".join(
        f"{source}: {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']} (got {e.get('input')!r})"
        for e in exc.errors()
    )


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file whose top level must be a mapping (empty file -> ``{}``); ConfigError names it."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def parse_train_config(data: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a mapping; raises ConfigError listing every bad field path."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + dotted-key overrides (``{"optim.epochs": 3}``) -> validated config."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data, source = read_yaml_mapping(path), str(path)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = parse_train_config(data, source)
    if cfg.model.objective == "rde" and cfg.model.projection != "identity":
        raise ConfigError(f"{source}: model.projection: RD-E (model.objective rde) needs 'identity'")
    if cfg.data.image_size % 32:
        raise ConfigError(f"{source}: data.image_size: must be a multiple of 32 (got {cfg.data.image_size})")
    if cfg.data.shape and any(v < 32 or v % 32 for v in cfg.data.shape):
        raise ConfigError(f"{source}: data.shape: both sides must be multiples of 32 (got {list(cfg.data.shape)})")
    return cfg
