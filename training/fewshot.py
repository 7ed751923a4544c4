"""Few-shot mode (seed 001, after COFT-AD, Liao et al., IEEE TIP 2024): a new part from K good images (K = 1..32).

Steps (:func:`fit_fewshot`):

1. **Contrastive fine-tuning** of the ImageNet teacher on the K images. Each step takes up to ``batch`` of them, two
   augmented views each (:mod:`training.augment`, a mild defect-aware policy: no greyscale, small colour changes,
   crops that keep most of the part), through the trunk, global pooling and a SimCLR projection head. The loss is a
   weighted contrastive cross-entropy over all views of the batch: the other view of the same image is a positive
   (NT-Xent), every view of a *different* good image is a positive of weight ``cross_weight`` (cross-instance pairs:
   the normal cluster tightens), and with ``negatives="synth"`` views of synthesised defects
   (:func:`training.synthetic.synthesize`) join the denominator as negatives only. A feature anchor (mean squared
   distance of the L2-normalised feature maps to the frozen teacher's) keeps the maps usable for localisation and
   stops the all-positive pull from collapsing the embedding. With K = 1 and no negatives there is nothing to
   contrast: the teacher is kept as it is (logged).
2. **Scoring** on the fine-tuned trunk, fitted on the K images and ``fit_views`` augmented copies of each:
   the image score is the Mahalanobis distance of the L2-normalised embedding (global mean of the three feature
   maps, concatenated) to a Gaussian with Ledoit-Wolf shrinkage (:class:`EmbeddingGaussian`, as the paper); the
   anomaly map is the per-position Gaussian :class:`training.scoring.DensityHead` (PaDiM-style) on the same features,
   upsampled to the input size and blurred.
3. **Threshold from the K images**: leave-one-out for K >= 2 (each image scored by a Gaussian fitted without it and
   its views), augmentation for K = 1 (fresh augmented views scored by the full Gaussian); the quantile+margin rule
   of :func:`training.threshold.calibrate_threshold` on those scores. The rule is returned with the model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from training.augment import AugmentPolicy, augment
from training.backbones import build_teacher, get_spec
from training.config import Aspect, input_hw
from training.scoring import DensityHead
from training.simclr import ProjectionHead, normalize
from training.threshold import calibrate_threshold

log = logging.getLogger(__name__)

#: Mild, defect-aware views: most of the part stays in the crop, colour barely moves, no greyscale.
FEWSHOT_POLICY = AugmentPolicy(
    name="fewshot",
    crop_scale=(0.6, 1.0),
    hflip_p=0.5,
    vflip_p=0.5,
    jitter_p=0.5,
    brightness=0.2,
    contrast=0.2,
    saturation=0.1,
    hue=0.02,
    grayscale_p=0.0,
    blur_p=0.3,
    blur_sigma=(0.1, 1.0),
)
#: Views for fitting the Gaussians: flips and light colour only (no crop: the per-position density needs alignment).
FIT_POLICY = FEWSHOT_POLICY.model_copy(update={"name": "fewshot-fit", "crop_scale": (1.0, 1.0), "blur_p": 0.0})


class FewShotConfig(BaseModel):
    """Settings of ``rdedge train --shots K`` (defaults are used as they are; nothing is tuned on test images)."""

    model_config = ConfigDict(extra="forbid")

    shots: int = Field(..., ge=1, le=32, description="K: good images to learn from")
    backbone: str = Field("efficientnet_lite0", description="teacher to fine-tune")
    image_size: int = Field(
        128, ge=32, multiple_of=32, description="input side, pixels (about image_size^2 pixels at the aspect)"
    )
    aspect: Aspect = Field(
        "auto", description="input height / width: auto (the shots' own when they share one) | square | a number"
    )
    shape: tuple[int, int] | None = Field(None, description="the input (height, width) resolved from the shots")
    steps: int = Field(40, ge=0, description="fine-tuning steps (0: keep the ImageNet teacher)")
    batch: int = Field(8, ge=1, description="images per step (two views each)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the trunk (head: 10x)")
    temperature: float = Field(0.2, gt=0, description="contrastive temperature tau")
    cross_weight: float = Field(0.5, ge=0, description="weight of a cross-instance positive (same image: 1)")
    anchor_weight: float = Field(1.0, ge=0, description="weight of the feature anchor to the frozen teacher")
    negatives: Literal["none", "synth"] = Field("none", description="synth: synthesised defects as negatives")
    fit_views: int = Field(8, ge=1, description="augmented copies of each image for fitting the Gaussians")
    density_dims: int = Field(64, ge=1, description="PCA dims of the per-position Gaussian")
    sigma: float = Field(4.0, gt=0, description="Gaussian blur of the anomaly map, pixels")
    target_far: float = Field(0.01, gt=0, lt=1, description="target false-alarm rate of the threshold rule")
    seed: int = Field(0, description="views, batches and head init")

    def input_hw(self) -> tuple[int, int]:
        """The input ``(height, width)``: the resolved ``shape``, else the square ``image_size``."""
        return input_hw(self.image_size, self.shape)


class EmbeddingGaussian(nn.Module):
    """Mahalanobis distance of the L2-normalised global embedding to a Gaussian (Ledoit-Wolf shrinkage).

    Input ``f1, f2, f3`` (a trunk's maps); output ``score (B,)``. Fit with :meth:`fit` on ``(N, D)`` embeddings.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("prec_chol", torch.eye(dim))  # precision = L L^T

    @staticmethod
    def embed(f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        """``(B, c1 + c2 + c3)`` global mean of each map, concatenated, L2-normalised."""
        e = torch.cat([f.mean(dim=(2, 3)) for f in (f1, f2, f3)], dim=1)
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        z = (self.embed(f1, f2, f3) - self.mean) @ self.prec_chol
        return z.pow(2).sum(dim=1).clamp_min(0.0).sqrt()

    @torch.no_grad()
    def fit(self, emb: Tensor) -> EmbeddingGaussian:
        from sklearn.covariance import LedoitWolf

        x = emb.double().numpy()
        lw = LedoitWolf().fit(x)
        cov = lw.covariance_
        cov = cov + 1e-3 * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))  # K = 1: rank-deficient
        prec = np.linalg.inv(cov)
        chol = np.linalg.cholesky((prec + prec.T) / 2)
        self.mean = torch.from_numpy(lw.location_).float()
        self.prec_chol = torch.from_numpy(chol).float()
        return self


def _blur_kernel(sigma: float) -> Tensor:
    r = int(math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).view(1, 1, 1, -1)


class FewShotModel(nn.Module):
    """``image (B, 3, H, W)`` normalised -> ``(anomaly_map (B, 1, H, W), score (B,))``: the exported shape."""

    def __init__(
        self, trunk: nn.Module, channels: tuple[int, int, int], hw: tuple[int, int], dims: int, sigma: float
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.density = DensityHead(channels, hw, dims)
        self.gaussian = EmbeddingGaussian(sum(channels))
        self.size = (int(hw[0]), int(hw[1]))
        self.register_buffer("kernel", _blur_kernel(sigma))

    def amap(self, density_map: Tensor) -> Tensor:
        """Stride-8 density map -> ``(B, 1, H, W)``: bilinear upsampling + separable Gaussian blur."""
        m = F.interpolate(density_map, size=self.size, mode="bilinear", align_corners=False)
        k = self.kernel
        pad = k.shape[-1] // 2
        m = F.conv2d(F.pad(m, (pad, pad, 0, 0), mode="reflect"), k)
        return F.conv2d(F.pad(m, (0, 0, pad, pad), mode="reflect"), k.transpose(2, 3))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        f1, f2, f3 = self.trunk(image)
        return self.amap(self.density(f1, f2, f3)), self.gaussian(f1, f2, f3)


@dataclass
class FewShotResult:
    """A fitted few-shot model and its threshold.

    Attributes:
        model: eval mode, frozen.
        threshold: image-score threshold (score >= threshold -> NG).
        threshold_rule: how it was set, in words.
        threshold_scores: the held-out good scores behind it (LOO or augmented views).
        log: per-step loss figures.
        seconds: fine-tuning and fitting wall time.
    """

    model: FewShotModel
    threshold: float
    threshold_rule: str
    threshold_scores: np.ndarray
    log: list[dict[str, float]]
    seconds: dict[str, float]


def _freeze_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def contrastive_loss(
    z: Tensor, inst: Tensor, temperature: float, cross_weight: float, z_neg: Tensor | None = None
) -> Tensor:
    """Weighted multi-positive contrastive cross-entropy.

    Args:
        z: ``(M, D)`` embeddings of the good views.
        inst: ``(M,)`` image index of each view (views of one image share it).
        temperature: tau.
        cross_weight: weight of a view of another image as a positive (a view of the same image weighs 1).
        z_neg: ``(Q, D)`` embeddings of synthesised defects: negatives only (never anchors).

    Returns:
        Scalar: mean over anchors of ``-sum_p w_p log softmax(sim / tau)_p / sum_p w_p``.
    """
    z = F.normalize(z, dim=1)
    cand = z if z_neg is None else torch.cat([z, F.normalize(z_neg, dim=1)])
    logits = z @ cand.t() / temperature  # (M, M [+ Q])
    m = z.shape[0]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, :m] = torch.eye(m, dtype=torch.bool)
    logp = F.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
    same = (inst[:, None] == inst[None, :]).float()
    w = torch.zeros_like(logits)
    w[:, :m] = same + cross_weight * (1.0 - same)
    w = w.masked_fill(self_mask, 0.0)
    keep = w.sum(dim=1) > 0
    loss = -(w * logp.masked_fill(w == 0, 0.0)).sum(dim=1)[keep] / w.sum(dim=1)[keep]
    return loss.mean()


def _embed(trunk: nn.Module, x: Tensor, batch: int = 16) -> list[Tensor]:
    out: list[list[Tensor]] = [[], [], []]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            for k, f in enumerate(trunk(x[i : i + batch])):
                out[k].append(f)
    return [torch.cat(o) for o in out]


def fine_tune(images01: Tensor, cfg: FewShotConfig) -> tuple[nn.Module, list[dict[str, float]]]:
    """Contrastive fine-tuning of the teacher on ``images01 (K, 3, H, W)`` in [0, 1]; returns (trunk, log)."""
    spec = get_spec(cfg.backbone)
    trunk = build_teacher(cfg.backbone)
    k = images01.shape[0]
    if cfg.steps == 0 or (k == 1 and cfg.negatives == "none"):
        if cfg.steps:
            log.info("few-shot: K = 1 without negatives has nothing to contrast; the ImageNet teacher is kept")
        return trunk.eval(), []
    frozen = build_teacher(cfg.backbone).eval()
    for p in trunk.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    head = ProjectionHead(sum(spec.channels), 128)
    opt = torch.optim.Adam(
        [{"params": trunk.parameters(), "lr": cfg.lr}, {"params": head.parameters(), "lr": cfg.lr * 10}]
    )
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    neg_bank: Tensor | None = None
    if cfg.negatives == "synth":
        from training.synthetic import synthesize

        defects, _, _ = synthesize(images01.permute(0, 2, 3, 1).numpy(), per_image=max(1, 16 // k), seed=cfg.seed)
        neg_bank = torch.from_numpy(defects).permute(0, 3, 1, 2).float().contiguous()
    trunk.train()
    _freeze_bn(trunk)
    history = []
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.permutation(k)[: cfg.batch])
        x = images01[idx]
        views = torch.cat([augment(x, FEWSHOT_POLICY, g), augment(x, FEWSHOT_POLICY, g)])
        inst = torch.cat([idx, idx])
        xv = normalize(views, spec.mean, spec.std)
        feats = trunk(xv)
        z = head(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))
        z_neg = None
        if neg_bank is not None:
            j = torch.from_numpy(rng.choice(len(neg_bank), min(len(neg_bank), 2 * len(idx)), replace=False))
            nf = trunk(normalize(augment(neg_bank[j], FEWSHOT_POLICY, g), spec.mean, spec.std))
            z_neg = head(torch.cat([f.mean(dim=(2, 3)) for f in nf], dim=1))
        l_con = contrastive_loss(z, inst, cfg.temperature, cfg.cross_weight, z_neg)
        with torch.no_grad():
            ref = frozen(xv)
        l_anchor = sum(
            (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(dim=1).mean()
            for a, b in zip(feats, ref, strict=True)
        ) / len(feats)
        loss = l_con + cfg.anchor_weight * l_anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "contrast": float(l_con.detach()),
                        "anchor": float(l_anchor.detach())})  # fmt: skip
        if (step + 1) % 10 == 0:
            log.info("few-shot step %d/%d: %s", step + 1, cfg.steps, history[-1])
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval(), history


def _fit_views(images01: Tensor, cfg: FewShotConfig, seed: int) -> tuple[Tensor, Tensor]:
    """The K images + ``fit_views - 1`` augmented copies each, normalised: ``(x (K * fit_views, 3, H, W), inst)``."""
    spec = get_spec(cfg.backbone)
    g = torch.Generator().manual_seed(seed)
    k = images01.shape[0]
    xs = [images01] + [augment(images01, FIT_POLICY, g) for _ in range(cfg.fit_views - 1)]
    inst = torch.arange(k).repeat(len(xs))
    return normalize(torch.cat(xs), spec.mean, spec.std), inst


def fit_fewshot(images01: Tensor, cfg: FewShotConfig) -> FewShotResult:
    """Fine-tune, fit both Gaussians and set the threshold on ``images01 (K, 3, H, W)`` in [0, 1].

    Raises:
        ValueError: the number of images is not ``cfg.shots``.
    """
    if images01.shape[0] != cfg.shots:
        raise ValueError(f"few-shot: expected {cfg.shots} images (--shots), got {images01.shape[0]}")
    if tuple(images01.shape[-2:]) != cfg.input_hw():
        raise ValueError(f"few-shot: images are {tuple(images01.shape[-2:])}, the config's input is {cfg.input_hw()}")
    t0 = time.perf_counter()
    trunk, history = fine_tune(images01, cfg)
    t1 = time.perf_counter()
    spec = get_spec(cfg.backbone)
    model = FewShotModel(trunk, spec.channels, cfg.input_hw(), cfg.density_dims, cfg.sigma)
    x, inst = _fit_views(images01, cfg, cfg.seed + 1)
    feats = _embed(trunk, x)
    model.density.fit(feats)
    emb = EmbeddingGaussian.embed(*feats)
    model.gaussian.fit(emb)
    k = cfg.shots
    if k >= 2:  # leave-one-out: image i scored by a Gaussian fitted on the others' views
        plain = _embed(trunk, normalize(images01, spec.mean, spec.std))
        plain_emb = EmbeddingGaussian.embed(*plain)
        held = []
        for i in range(k):
            gi = EmbeddingGaussian(emb.shape[1]).fit(emb[inst != i])
            held.append(float(_score_emb(gi, plain_emb[i : i + 1])[0]))
        rule = f"leave-one-out over the K = {k} images (each scored by the Gaussian fitted without it and its views)"
    else:  # K = 1: fresh augmented views (another seed) scored by the full Gaussian
        xv, _ = _fit_views(images01, cfg.model_copy(update={"fit_views": 17}), cfg.seed + 2)
        held = list(_score_emb(model.gaussian, EmbeddingGaussian.embed(*_embed(trunk, xv[1:]))))
        rule = "augmentation: 16 fresh augmented views of the single image scored by the fitted Gaussian"
    thr = calibrate_threshold(np.asarray(held), cfg.target_far, rule="quantile+margin")  # as measured in few_shot.md
    rule = f"{rule}; quantile+margin (target false-alarm rate {cfg.target_far:g}, margin {thr.margin:g})"
    model.eval()
    t2 = time.perf_counter()
    log.info("few-shot K=%d: threshold %.4g (%s); fine-tune %.1f s, fit %.1f s", k, thr.value, rule, t1 - t0, t2 - t1)
    return FewShotResult(
        model, float(thr.value), rule, np.asarray(held), history, {"fine_tune": t1 - t0, "fit": t2 - t1}
    )


def _score_emb(g: EmbeddingGaussian, emb: Tensor) -> np.ndarray:
    """``(N, D)`` embeddings -> ``(N,)`` Mahalanobis distances under ``g``."""
    with torch.no_grad():
        return ((emb - g.mean) @ g.prec_chol).pow(2).sum(dim=1).clamp_min(0.0).sqrt().double().numpy()


# ------------------------------------------------------------------------------------------------ run folder I/O

CHECKPOINT_NAME = "fewshot.pt"
CHECKPOINT_KIND = "rdedge-fewshot"


def choose_shots(data: str | Path, shots: int, seed: int) -> list[Path]:
    """``shots`` good images drawn (numpy seed ``seed``) from ``data/train/good`` (or a folder of good images).

    Raises:
        DataError: the folder is missing or holds fewer than ``shots`` images.
    """
    from training.data import discover
    from training.errors import DataError

    good = sorted(s.path for s in discover(data, val_fraction=0.0, seed=seed).train)
    if len(good) < shots:
        raise DataError(f"{data}: --shots {shots} but only {len(good)} good training images")
    idx = np.sort(np.random.default_rng(seed).choice(len(good), shots, replace=False))
    return [good[i] for i in idx]


def load_images01(paths: list[Path], hw: tuple[int, int]) -> Tensor:
    """Decode ``paths`` -> ``(N, 3, H, W)`` float32 RGB in [0, 1] (training's decoding and resizing)."""
    from training.data import preprocess, read_image

    zeros, ones = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return torch.from_numpy(np.stack([preprocess(read_image(p), hw, zeros, ones) for p in paths]))


def train_fewshot(data: str | Path, out: str | Path, cfg: FewShotConfig) -> Path:
    """``rdedge train --shots K``: draw K good images, :func:`fit_fewshot`, write ``out/fewshot.pt``; returns it.

    The checkpoint is a plain dict (tensors, numbers, strings; ``torch.load(weights_only=True)`` reads it): ``kind``,
    ``config`` (:class:`FewShotConfig`), ``model`` (the :class:`FewShotModel` state_dict), ``threshold`` (value,
    rule, the held-out scores), ``shots`` (the image paths) and ``log``.
    """
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = choose_shots(data, cfg.shots, cfg.seed)
    log.info("few-shot: K = %d good images from %s: %s", cfg.shots, data, ", ".join(p.name for p in paths))
    if cfg.shape is None:
        from training.data import resolve_hw

        hw, why = resolve_hw(cfg.image_size, cfg.aspect, paths)
        log.info("few-shot: input %d x %d px (height x width): %s", *hw, why)
        cfg = cfg.model_copy(update={"shape": hw})
    res = fit_fewshot(load_images01(paths, cfg.input_hw()), cfg)
    ckpt = {
        "kind": CHECKPOINT_KIND,
        "version": 1,
        "config": cfg.model_dump(),
        "model": res.model.state_dict(),
        "threshold": {
            "value": res.threshold,
            "rule": res.threshold_rule,
            "scores": [float(s) for s in res.threshold_scores],
        },
        "shots": [str(p) for p in paths],
        "log": res.log,
        "seconds": res.seconds,
    }
    path = out / CHECKPOINT_NAME
    torch.save(ckpt, path)
    (out / "fewshot.json").write_text(json.dumps({k: v for k, v in ckpt.items() if k != "model"}, indent=2))
    return path


def is_fewshot_run(run: str | Path) -> bool:
    """A run folder (or checkpoint file) written by :func:`train_fewshot`."""
    run = Path(run)
    return (run / CHECKPOINT_NAME).is_file() or (run.is_file() and run.name == CHECKPOINT_NAME)


def load_fewshot(run: str | Path) -> tuple[FewShotModel, FewShotConfig, dict]:
    """Rebuild the eval-mode :class:`FewShotModel` of a few-shot run; returns ``(model, config, checkpoint)``.

    Raises:
        CheckpointError: missing or foreign checkpoint, or weights that do not fit the stored config.
    """
    from training.errors import CheckpointError

    run = Path(run)
    path = run / CHECKPOINT_NAME if run.is_dir() else run
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a run folder written by 'rdedge train --shots K'?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a few-shot checkpoint")
    cfg = FewShotConfig.model_validate(ckpt["config"])
    spec = get_spec(cfg.backbone)
    model = FewShotModel(build_teacher(cfg.backbone, pretrained=False), spec.channels, cfg.input_hw(),
                         cfg.density_dims, cfg.sigma)  # fmt: skip
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {cfg.backbone} ({str(exc)[:200]})") from None
    return model.eval(), cfg, ckpt
