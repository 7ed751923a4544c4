"""Settings of the training objectives beyond plain RD (``TrainConfig.extra``): SimCLR-auxiliary alignment and RD++.

Pure pydantic (no torch) so :mod:`training.config` can import it. Every field has a default, so a config written
before these objectives existed (``extra: {}``) still validates, and YAML only lists what it changes::

    model: {projection: aux}
    extra:
      aux: {weight: 0.5, scales: [1, 2]}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuxConfig(_Strict):
    """RD + SimCLR auxiliary backbone (``model.projection: aux``, ``rdedge train --aux SIMCLR_DIR``)."""

    weight: float = Field(1.0, ge=0.0, description="lambda: loss = L_KD + weight * L_align")
    scales: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="teacher scales aligned to the auxiliary (0: s4, 1: s8, 2: s16)"
    )
    proj_lr: float | None = Field(None, gt=0, description="Adam lr of the projection heads (default: optim.lr)")

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v: list[int]) -> list[int]:
        if not v or any(s not in (0, 1, 2) for s in v) or len(set(v)) != len(v):
            raise ValueError("scales must be a non-empty list of distinct values from 0, 1, 2")
        return sorted(v)


class RDPPConfig(_Strict):
    """RD++ (Tien et al., CVPR 2023) objectives (``model.projection: rdpp``). Defaults are the official code's."""

    weight: float = Field(0.2, ge=0.0, description="weight of the projection loss: L_KD + weight * L_proj")
    w_ssot: float = Field(1.0, ge=0.0, description="weight of the Sinkhorn (self-supervised optimal transport) term")
    w_recon: float = Field(0.01, ge=0.0, description="weight of the pseudo-anomaly reconstruction term")
    w_contrast: float = Field(0.1, ge=0.0, description="weight of the contrast (cosine embedding) term")
    norm: float = Field(1.11, gt=0.0, description="L_proj = (w_ssot*ssot + w_recon*recon + w_contrast*contrast)/norm")
    margin: float = Field(0.5, ge=-1.0, le=1.0, description="cosine embedding margin of the contrast term")
    proj_lr: float = Field(0.001, gt=0.0, description="Adam lr of the projection layers (decoder + OCBE: optim.lr)")
    sinkhorn_blur: float = Field(0.05, gt=0.0, description="Sinkhorn blur (epsilon = blur**2, geomloss convention)")
    sinkhorn_iters: int = Field(50, ge=1, description="log-domain Sinkhorn iterations")
    noise_scale: float = Field(0.2, ge=0.0, description="simplex noise amplitude added to the [0, 1] image")
    noise_min: int = Field(10, ge=1, description="smallest pseudo-anomaly patch side in pixels")
    noise_max: int = Field(32, ge=1, description="largest pseudo-anomaly patch side in pixels")
    octaves: int = Field(6, ge=1, le=10, description="simplex noise octaves")
    persistence: float = Field(0.6, gt=0.0, le=1.0, description="amplitude ratio between successive octaves")
    noise_bank: int = Field(64, ge=0, description="pre-computed noise tiles (seeded); 0: generate every step")


class RDEConfig(_Strict):
    """RD-E (Liu et al., AAAI 2025; ``model.objective: rde``). Defaults are the paper's unless stated."""

    gii: Literal["gated", "ungated", "off"] = Field(
        "gated", description="guided information injection: gated by cos(D, T) | ungated | off (plain decoder)"
    )
    teacher_lr: float = Field(1e-4, gt=0.0, description="Adam lr of the trainable teacher (student: optim.lr)")
    teacher_betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas of the trainable teacher")
    beta_max: float = Field(0.8, gt=0.0, le=1.0, description="texture opacity beta drawn from [0, beta_max)")
    perlin_min: int = Field(0, ge=0, le=6, description="smallest Perlin scale exponent (grid 2**k cells)")
    perlin_max: int = Field(5, ge=0, le=6, description="largest Perlin scale exponent")
    threshold: float = Field(0.5, gt=-1.0, lt=1.0, description="Perlin noise > threshold -> anomaly mask")
    texture: Literal["mixed", "images", "simplex"] = Field(
        "mixed",
        description="anomaly fill (DTD is not available): crops of other training images | simplex noise | both",
    )

    @field_validator("perlin_max")
    @classmethod
    def _check_scales(cls, v: int, info: ValidationInfo) -> int:
        if v < info.data.get("perlin_min", 0):
            raise ValueError("perlin_max must be >= perlin_min")
        return v


class ExtraConfig(_Strict):
    """``TrainConfig.extra``: settings of the auxiliary, RD++ and RD-E objectives (ignored by plain RD)."""

    aux: AuxConfig = Field(default_factory=AuxConfig, description="SimCLR-auxiliary alignment")
    rdpp: RDPPConfig = Field(default_factory=RDPPConfig, description="RD++ projection objectives")
    rde: RDEConfig = Field(default_factory=RDEConfig, description="RD-E expert-teacher-student objective")
