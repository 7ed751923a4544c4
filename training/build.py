"""Build the inference model from a config, and rebuild it from a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from training.backbones import build_teacher, get_spec
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, parse_train_config
from training.errors import CheckpointError, ConfigError
from training.model import IdentityProjection, ReverseDistillation


def build_projection(cfg: TrainConfig) -> nn.Module:
    """The projection stage between teacher and OCBE for ``cfg.model.projection``."""
    kind = cfg.model.projection
    if kind == "auto":
        raise ConfigError(
            "model.projection 'auto' names a choice among students, not one model: train it with fit(), or build "
            "from the chosen run's checkpoint config"
        )
    if kind == "identity":
        return IdentityProjection()
    from training import projection as proj  # trained projections (SimCLR-aligned heads, RD++)

    return proj.build(kind, get_spec(cfg.model.backbone), cfg.extra)


def build_model(cfg: TrainConfig, pretrained: bool | None = None) -> ReverseDistillation:
    """Teacher (frozen, ImageNet or ``teacher_weights``) + projection + OCBE + decoder (RD-E: :class:`RDEModel`)."""
    spec = get_spec(cfg.model.backbone)
    if cfg.model.signed_decoder is not None:
        spec = dataclasses.replace(spec, signed=cfg.model.signed_decoder)
    teacher = build_teacher(
        cfg.model.backbone,
        cfg.model.teacher_weights,
        cfg.model.pretrained if pretrained is None else pretrained,
    )
    if cfg.model.objective == "rde":  # RD-E: the teacher is the tuned copy, the decoder may read its features
        from training.rde import RDEModel

        return RDEModel(teacher, spec, cfg.extra.rde.gii)
    return ReverseDistillation(teacher, spec, build_projection(cfg))


def load_model(run: str | Path) -> tuple[ReverseDistillation, TrainConfig, dict[str, Any]]:
    """Rebuild the inference model from a run folder or checkpoint file (teacher weights come from the checkpoint).

    Returns:
        (model in eval mode, its config, the raw checkpoint dict).
    """
    ckpt = load_checkpoint(run)
    cfg = parse_train_config(ckpt["config"], f"{run} (stored config)")
    model = build_model(cfg, pretrained=False)  # every weight, teacher included, is in the checkpoint
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)[:200]
        raise CheckpointError(
            f"{run}: checkpoint does not fit the {cfg.model.backbone} architecture ({first.strip()})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{run}: checkpoint does not fit the {cfg.model.backbone} architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return model, cfg, ckpt
