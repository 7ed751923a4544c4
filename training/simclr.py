"""SimCLR (Chen et al., 2020) pretraining of an auxiliary backbone on the defect-free training images.

The backbone is one of :mod:`training.backbones` (same ``[f1, f2, f3]`` outputs as a teacher), started from ImageNet
(``init: imagenet``, fine-tuning) or from random weights (``init: scratch``): the two strategies of Guo et al.'s
"Contrastive Learning Based Knowledge Distillation for Enhancing Defect Detection". Each image gives two augmented
views (:mod:`training.augment`); the three feature maps are globally average-pooled and concatenated, so every scale
that the RD projection heads later align to gets trained, then a 2-layer MLP head maps them to the NT-Xent space.

Only ``train/good`` minus the validation split is used (the same split as ``rdedge train`` with the same seed,
``val_fraction`` and ``max_images``); the test set is never read.

Output folder: ``simclr.pt`` (``format: rdedge-simclr``: backbone name, init, config, backbone and head
state_dicts, per-epoch history), ``config.json``, ``log.jsonl`` (loss and contrastive top-1 accuracy per epoch).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from training.augment import AugmentPolicy, augment, load_policy
from training.backbones import get_spec
from training.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMAT = "rdedge-simclr"
VERSION = 1
CHECKPOINT = "simclr.pt"


class SimCLRConfig(BaseModel):
    """``rdedge pretrain`` settings (stored in the checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("efficientnet_lite0", description="registry backbone (use the teacher's architecture)")
    init: Literal["imagenet", "scratch"] = Field("imagenet", description="fine-tune ImageNet weights or train from 0")
    epochs: int = Field(100, ge=1, description="passes over the training images")
    batch_size: int = Field(32, ge=2, description="images per step (2N views; larger is better for SimCLR)")
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    augment: str = Field("default", description="augmentation policy name or YAML path")
    image_size: int = Field(256, ge=32, le=2048, description="square side in pixels (use the RD training size)")
    lr: float | None = Field(None, gt=0, description="Adam lr (default: 1e-4 for imagenet, 1e-3 for scratch)")
    weight_decay: float = Field(1e-6, ge=0, description="Adam weight decay")
    head_dim: int = Field(128, ge=8, description="output width of the MLP projection head")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held out like rdedge train (never trained on)")
    max_images: int | None = Field(None, ge=2, description="at most this many train/good images, chosen evenly")
    max_minutes: float | None = Field(None, gt=0, description="stop at the end of the epoch past this wall time")
    seed: int = Field(0, description="seeds the split, init, shuffling and augmentations")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu or cuda")


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent loss and contrastive top-1 accuracy.

    For 2N embeddings (row i of ``z1`` and row i of ``z2`` are the positive pair), each row's logits are the cosine
    similarities to the other 2N-1 rows divided by ``temperature``; the loss is the mean cross-entropy of picking the
    positive. Accuracy: share of rows whose most similar other row is their positive.

    Args:
        z1, z2: ``(N, D)`` embeddings of the two views (not necessarily normalised).
        temperature: tau > 0.

    Returns:
        (scalar loss, scalar accuracy in [0, 1]).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(1) == target).float().mean()
    return loss, acc


class ProjectionHead(nn.Module):
    """2-layer MLP ``(B, in_dim) -> (B, out_dim)`` (Linear, ReLU, Linear), SimCLR's g(.)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class SimCLRNet(nn.Module):
    """Backbone ``[f1, f2, f3]`` -> concatenated global average pools ``(B, c1+c2+c3)`` -> MLP head ``(B, D)``."""

    def __init__(self, backbone: nn.Module, channels: tuple[int, int, int], head_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(sum(channels), head_dim)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in self.backbone(x)], dim=1)
        return self.head(pooled)


def build_trainable_backbone(name: str, init: str) -> nn.Module:
    """A registry backbone in train mode with every parameter trainable (teachers are frozen; this one is not)."""
    spec = get_spec(name)
    net = spec.build(None, init == "imagenet")
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train()


def _load_images(samples: list[Any], size: int) -> Tensor:
    """Decode the training images once: ``(N, 3, size, size)`` float32 in [0, 1] (SimCLR re-augments them)."""
    from training.data import ImageDataset

    ds = ImageDataset(samples, (size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), skip_unreadable=True)
    return torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))]))  # type: ignore[misc]


def normalize(x01: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def pretrain(cfg: SimCLRConfig, data: str | Path, out_dir: str | Path, show_progress: bool = True) -> Path:
    """Run SimCLR on the good training images of ``data``; returns the checkpoint path (``out_dir/simclr.pt``)."""
    from tqdm import tqdm

    from training.data import discover

    policy: AugmentPolicy = load_policy(cfg.augment)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use --device cpu")
    device = torch.device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.backbone)
    splits = discover(data, cfg.val_fraction, cfg.seed, max_images=cfg.max_images)
    images = _load_images(splits.train, cfg.image_size)
    n = images.shape[0]
    if n < 2:
        raise ConfigError(f"SimCLR needs at least 2 training images, {data} has {n}")
    batch = min(cfg.batch_size, n)
    net = SimCLRNet(build_trainable_backbone(cfg.backbone, cfg.init), spec.channels, cfg.head_dim).to(device)
    lr = cfg.lr or (1e-4 if cfg.init == "imagenet" else 1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    log_path = out / "log.jsonl"
    log_path.write_text("")
    log.info(
        "SimCLR %s (%s) on %d images, %dpx, batch %d, policy %s, tau %.2f, lr %.1e",
        cfg.backbone,
        cfg.init,
        n,
        cfg.image_size,
        batch,
        policy.name,
        cfg.temperature,
        lr,
    )
    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.randperm(n, generator=g)
        steps = [order[i : i + batch] for i in range(0, n - batch + 1, batch)]  # drop the ragged last batch
        sums = {"loss": 0.0, "top1": 0.0}
        bar = tqdm(steps, desc=f"simclr {epoch + 1}/{cfg.epochs}", unit="batch", disable=not show_progress, leave=False)
        for idx in bar:
            x = images[idx]
            v1 = normalize(augment(x, policy, g), spec.mean, spec.std).to(device)
            v2 = normalize(augment(x, policy, g), spec.mean, spec.std).to(device)
            loss, acc = nt_xent(net(v1), net(v2), cfg.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SimCLR loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            sums["top1"] += float(acc)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", top1=f"{float(acc):.2f}")
        elapsed = time.perf_counter() - t_start
        record = {"epoch": epoch + 1, **{k: v / len(steps) for k, v in sums.items()}, "elapsed_s": elapsed}
        history.append(record)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "simclr epoch %d/%d loss %.4f top1 %.3f  %.0fs",
            epoch + 1,
            cfg.epochs,
            record["loss"],
            record["top1"],
            elapsed,
        )
        save_simclr(out / CHECKPOINT, cfg, net, epoch, history, policy)
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            log.info("max_minutes=%.1f reached after epoch %d", cfg.max_minutes, epoch + 1)
            break
    return out / CHECKPOINT


def save_simclr(
    path: Path, cfg: SimCLRConfig, net: SimCLRNet, epoch: int, history: list[dict[str, float]], policy: AugmentPolicy
) -> None:
    import os

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": cfg.backbone,
        "init": cfg.init,
        "config": cfg.model_dump(mode="json"),
        "augment": policy.model_dump(mode="json"),
        "epoch": epoch,
        "backbone_state": {k: v.detach().cpu() for k, v in net.backbone.state_dict().items()},
        "head_state": {k: v.detach().cpu() for k, v in net.head.state_dict().items()},
        "history": history,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_simclr(path: str | Path) -> dict[str, Any]:
    """Load ``simclr.pt`` (or a folder holding it) with ``weights_only=True``; raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"SimCLR checkpoint not found: {path} (run 'rdedge pretrain --out DIR' first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        raise CheckpointError(f"{path}: not a readable SimCLR checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: not an rdedge SimCLR checkpoint (format {FORMAT!r} v{VERSION})")
    try:
        SimCLRConfig.model_validate(ckpt["config"])
    except ValidationError as exc:
        raise CheckpointError(f"{path}: stored config is invalid ({exc.error_count()} errors)") from None
    return ckpt


def load_aux_backbone(path: str | Path) -> tuple[nn.Module, str]:
    """The SimCLR backbone as a frozen auxiliary model (eval mode, no gradients). Returns (module, backbone name)."""
    ckpt = load_simclr(path)
    name = ckpt["backbone"]
    net = get_spec(name).build(None, False)
    try:
        net.load_state_dict(ckpt["backbone_state"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: backbone weights do not fit {name} ({exc})") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, name
