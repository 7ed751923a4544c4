"""Reverse Distillation training loop: ``train_one_epoch``, ``validate``, ``fit``. Reads top to bottom.

Model selection uses the validation split (defect-free images kept aside from train/good): the checkpoint with the
lowest validation loss is ``checkpoint_best.pt``. The test set is never touched here.

Multi-GPU / multi-process: run under ``torchrun --nproc_per_node N -m training.train ...`` or ``rdedge train`` with
``WORLD_SIZE`` set; each rank sees its DistributedSampler shard, rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from training.build import build_model
from training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import ImageDataset, discover
from training.errors import CheckpointError, ConfigError
from training.loss import flattened_cosine_loss
from training.model import ReverseDistillation

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def collate(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    out = {"image": torch.from_numpy(np.stack([b["image"] for b in batch]))}
    out["label"] = torch.tensor([b["label"] for b in batch])
    if "mask" in batch[0]:
        out["mask"] = torch.from_numpy(np.stack([b["mask"] for b in batch]))
    return out


class Objective:
    """Plain RD: flattened cosine between teacher and decoder features. Subclasses add auxiliary terms."""

    def parameters_groups(self, model: ReverseDistillation, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas)]

    def loss(self, model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        feats, recon = model(images)
        kd = flattened_cosine_loss(feats, recon)
        return kd, {"kd": float(kd.detach())}

    def state_dict(self) -> dict[str, Any] | None:
        """Training-only weights (e.g. an auxiliary backbone) saved apart from the inference model."""
        return None


def build_objective(cfg: TrainConfig, model: ReverseDistillation, aux_dir: str | Path | None) -> Objective:
    """The objective for ``cfg.model.projection`` (plain RD, SimCLR-auxiliary alignment or RD++)."""
    if cfg.model.projection == "identity":
        if aux_dir is not None:
            raise ConfigError("--aux needs model.projection 'aux' (set automatically by 'rdedge train --aux')")
        return Objective()
    from training import objectives

    return objectives.build(cfg, model, aux_dir)


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    optimizers: list[torch.optim.Optimizer],
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    epochs: int,
    show_progress: bool,
) -> dict[str, float]:
    """One pass over the training images; returns mean losses and images/s."""
    from tqdm import tqdm

    model.train()
    sums: dict[str, float] = {}
    n_img, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not show_progress, leave=False)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss, parts = objective.loss(model, images)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}; lower optim.lr")
        loss.backward()
        for opt in optimizers:
            opt.step()
        n = images.shape[0]
        n_img += n
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * n
        ips = n_img / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{sums['loss'] / n_img:.4f}", img_s=f"{ips:.1f}")
    out = {k: v / max(n_img, 1) for k, v in sums.items()}
    out["images_per_s"] = n_img / max(time.perf_counter() - t0, 1e-9)
    return out


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Mean RD loss on the held-out good images (model selection without the test set)."""
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        images = batch["image"].to(device)
        feats, recon = model(images)
        # per-image loss so the mean does not depend on the batch split
        for i in range(images.shape[0]):
            total += float(flattened_cosine_loss([f[i : i + 1] for f in feats], [r[i : i + 1] for r in recon]))
            n += 1
    return total / max(n, 1)


def _log_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def fit(
    cfg: TrainConfig,
    data: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    aux_dir: str | Path | None = None,
    show_progress: bool = True,
) -> Path:
    """Train RD on the good images of ``data`` and write checkpoints + ``log.jsonl`` to ``out_dir``.

    Returns:
        Path of the best checkpoint (lowest validation loss; the last one if there is no validation split).
    """
    dinfo = init_distributed(cfg.device)
    if not dinfo.is_main:
        logging.getLogger("training").setLevel(logging.WARNING)  # rank 0 logs for everyone
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use --device cpu")
    device = torch.device("cuda", dinfo.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    splits = discover(data, cfg.data.val_fraction, cfg.seed, max_images=cfg.data.max_images)
    size = (cfg.data.image_size, cfg.data.image_size)
    model = build_model(cfg).to(device)
    spec_mean, spec_std = _norm(cfg)
    train_ds = ImageDataset(splits.train, size, spec_mean, spec_std, skip_unreadable=True)
    val_ds = ImageDataset(splits.val, size, spec_mean, spec_std, skip_unreadable=True) if splits.val else None
    objective = build_objective(cfg, model, aux_dir)
    optimizers = objective.parameters_groups(model, cfg)

    start_epoch, best, history_best_epoch = 0, math.inf, -1
    if resume:
        last = out / LAST
        if not last.is_file():
            raise CheckpointError(f"--resume: no {LAST} in {out}")
        ckpt = load_checkpoint(last)
        diff = _config_diff(ckpt["config"], cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(
                f"--resume: {', '.join(diff)} differ(s) from the config stored in {last}; "
                "only optim.epochs and optim.max_minutes may change on resume (use a new --out otherwise)"
            )
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
            opt.load_state_dict(state)
        if ckpt.get("aux") is not None and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(ckpt["aux"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt.get("best_val_loss", math.inf)
        log.info("resuming from epoch %d (best validation loss %.5f)", start_epoch, best)

    train_model: nn.Module = model
    sampler = None
    if dinfo.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dinfo.local_rank] if cfg.device == "cuda" else None
        )
        sampler = DistributedSampler(train_ds, num_replicas=dinfo.world_size, rank=dinfo.rank, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.optim.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=g,
        drop_last=len(train_ds) > cfg.optim.batch_size * dinfo.world_size,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
    )
    val_loader = (
        DataLoader(val_ds, batch_size=cfg.optim.batch_size, shuffle=False, collate_fn=collate) if val_ds else None
    )
    split_record = {"train": [str(s.path) for s in train_ds.samples], "val": [str(s.path) for s in splits.val]}
    if dinfo.is_main:
        (out / "split.json").write_text(json.dumps(split_record, indent=1))
        (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        log.info(
            "training %s RD on %d images (%d validation, %d skipped), %dx%d, batch %d, %d epochs, device %s",
            cfg.model.backbone,
            len(train_ds),
            len(splits.val),
            len(train_ds.skipped),
            *size,
            cfg.optim.batch_size,
            cfg.optim.epochs,
            device,
        )
    t_start = time.perf_counter()
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.optim.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = train_one_epoch(
            train_model, objective, optimizers, loader, device, epoch, cfg.optim.epochs, show_progress and dinfo.is_main
        )
        val_loss = math.nan
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs
        if dinfo.is_main and val_loader is not None and due:
            val_loss = validate(model, val_loader, device)
        elapsed = time.perf_counter() - t_start
        if dinfo.is_main:
            improved = not math.isnan(val_loss) and val_loss < best
            if improved:
                best, history_best_epoch = val_loss, epoch
            payload = {
                "config": cfg.model_dump(mode="json"),
                "seed": cfg.seed,
                "epoch": epoch,
                "model": model.state_dict(),
                "aux": objective.state_dict(),
                "optimizer": [opt.state_dict() for opt in optimizers],
                "best_val_loss": best,
                "split": split_record,
            }
            save_checkpoint(out / LAST, payload)
            if improved or val_loader is None:
                save_checkpoint(out / BEST, payload)
            record = {"epoch": epoch + 1, **stats, "val_loss": val_loss, "best": improved, "elapsed_s": elapsed}
            _log_jsonl(out / "log.jsonl", record)
            log.info(
                "epoch %d/%d loss %.4f val %.4f%s  %.1f img/s  %.0fs",
                epoch + 1,
                cfg.optim.epochs,
                stats["loss"],
                val_loss,
                " *" if improved else "",
                stats["images_per_s"],
                elapsed,
            )
        stop = [cfg.optim.max_minutes is not None and elapsed > cfg.optim.max_minutes * 60]
        if dinfo.world_size > 1:
            dist.broadcast_object_list(stop, src=0)  # every rank must leave the loop at the same epoch
        if stop[0]:
            log.info("optim.max_minutes=%.1f reached after epoch %d", cfg.optim.max_minutes, epoch + 1)
            break
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if dinfo.is_main and not (out / BEST).is_file() and (out / LAST).is_file():
        # validation never ran (e.g. resumed past the end): the last checkpoint is the only candidate
        import shutil

        shutil.copyfile(out / LAST, out / BEST)
    if dinfo.is_main:
        log.info("done: best validation loss %.5f at epoch %d -> %s", best, history_best_epoch + 1, out / BEST)
    return out / BEST


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, ignoring the settings that a resume may extend."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in ("optim.epochs", "optim.max_minutes"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def _norm(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from training.backbones import get_spec

    spec = get_spec(cfg.model.backbone)
    return spec.mean, spec.std


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train`` (used by torchrun): the same arguments as ``rdedge train``."""
    from training.cli import train_command, train_parser

    args = train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
