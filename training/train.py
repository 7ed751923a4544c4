"""Reverse Distillation training loop: ``train_one_epoch``, ``validate``, ``fit``. Reads top to bottom.

Model selection uses the validation split (defect-free images kept aside from train/good) and synthetic defects
made from it (:mod:`training.selection`); the test set is never touched here.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.build import build_model
from training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import discover
from training.errors import CheckpointError, ConfigError
from training.features import FeatureSet
from training.loss import flattened_cosine_loss
from training.model import ReverseDistillation

if TYPE_CHECKING:
    from training.data import Sample, Splits
    from training.scoring import ChannelStats, DensityHead
    from training.selection import Selector

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
    """Plain RD: flattened cosine between teacher and decoder features. Subclasses add auxiliary terms.

    ``loss`` gets the :class:`~training.model.Student` (possibly DDP-wrapped), the batch's cached teacher features
    and its preprocessed images (for objectives that need more than the frozen teacher's view).
    """

    def parameters_groups(self, model: ReverseDistillation, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas)]

    def loss(self, student: nn.Module, feats: list[Tensor], images: Tensor) -> tuple[Tensor, dict[str, float]]:
        recon = student(*feats)
        kd = flattened_cosine_loss(feats, recon)
        return kd, {"kd": float(kd.detach())}

    def state_dict(self) -> dict[str, Any] | None:
        """Training-only weights (e.g. an auxiliary backbone) saved apart from the inference model."""
        return None


def build_objective(cfg: TrainConfig, model: ReverseDistillation, aux_dir: str | Path | None) -> Objective:
    """The objective for ``cfg.model.projection`` (plain RD, SimCLR-auxiliary alignment or RD++)."""
    if cfg.model.projection == "identity":  # fit() refused an --aux for it already
        return Objective()
    from training import objectives

    return objectives.build(cfg, model, aux_dir)


@torch.no_grad()
def validation_loss(student: nn.Module, fs: FeatureSet, batch: int = 16) -> float:
    """Mean per-image RD loss on held-out good images (logged for information; selection uses the signal)."""
    student.eval()
    total = 0.0
    for i in range(0, len(fs), batch):
        feats = [f[i : i + batch] for f in fs.feats]
        recon = student(*feats)
        for j in range(feats[0].shape[0]):
            total += float(flattened_cosine_loss([f[j : j + 1] for f in feats], [r[j : j + 1] for r in recon]))
    return total / max(len(fs), 1)


def _log_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def to_unit_rgb(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised ``(N, 3, H, W)`` -> ``(N, H, W, 3)`` in [0, 1]."""
    m, s = np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x * s + m).transpose(0, 2, 3, 1))


def from_unit_rgb(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(N, H, W, 3)`` in [0, 1] -> normalised ``(N, 3, H, W)``."""
    m, s = np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x.transpose(0, 3, 1, 2) - m) / s).astype(np.float32)


@dataclass
class ResumeState:
    """Where a resumed run picks up (the defaults: a fresh run)."""

    step: int = 0
    best_signal: float = -math.inf
    best_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    aux: Any = None


def resume_from(out: Path, cfg: TrainConfig, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> ResumeState:
    """Load ``out/checkpoint_last.pt`` into ``model`` and ``optimizers`` after checking that only the budget changed.

    The caller restores what is its own from ``ResumeState.aux`` (an objective's state, RD-E's expert).
    """
    last = out / LAST
    if not last.is_file():
        raise CheckpointError(f"--resume: no {LAST} in {out}")
    ckpt = load_checkpoint(last)
    diff = _config_diff(ckpt["config"], cfg.model_dump(mode="json"))
    if diff:
        raise ConfigError(
            f"--resume: {', '.join(diff)} differ(s) from the config stored in {last}; only optim.steps, "
            "optim.epochs and optim.max_minutes may change on resume (use a new --out otherwise)"
        )
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
        opt.load_state_dict(state)
    rs = ResumeState(
        int(ckpt["step"]),
        float(ckpt.get("best_signal", -math.inf)),
        int(ckpt.get("best_step", -1)),
        list(ckpt.get("history", [])),
        ckpt.get("aux"),
    )
    log.info("resuming from step %d (best signal %.4f at step %d)", rs.step, rs.best_signal, rs.best_step)
    return rs


def _batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[Tensor]:
    """The index batches of one epoch: a seeded permutation (the same on resume), this rank's share."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    perm = perm[: n - n % world][rank::world]  # equal shares: every rank runs the same number of steps
    drop_last = len(perm) > batch
    stop = len(perm) - len(perm) % batch if drop_last else len(perm)
    return [perm[i : i + batch] for i in range(0, stop, batch)]


@dataclass
class Frozen:
    """Everything a run computes before training that no student changes: the split, the decoded images' teacher
    features, channel statistics, the density head and the selector (validation images + synthetic defects).

    :func:`prepare` makes it; :mod:`training.candidates` makes it once and trains every student on it.
    """

    splits: Splits
    train_fs: FeatureSet
    train_samples: list[Sample]
    skipped: list[Any]
    stats: ChannelStats
    density: DensityHead | None = None
    good_fs: FeatureSet | None = None
    selector: Selector | None = None
    val_samples: list[Sample] = field(default_factory=list)
    cache_s: float = 0.0
    knn_choice: dict[str, Any] | None = None
    wide_choice: dict[str, Any] | None = None
    centre_choice: dict[str, Any] | None = None


def split_paths(train: list[Sample], val: list[Sample], unused: list[Sample] | None = None) -> dict[str, list[str]]:
    """``split.json`` / the checkpoint's ``split``: absolute paths, so export and evaluate work from any directory.
    ``unused``: the train/good images ``max_images`` left out (threshold calibration only)."""
    out = {"train": [str(s.path.absolute()) for s in train], "val": [str(s.path.absolute()) for s in val]}
    out["unused"] = [str(s.path.absolute()) for s in unused or []]
    return out


def resolve_device(cfg: TrainConfig, dinfo: DistInfo) -> torch.device:
    """``cfg.device`` on this rank (``cuda:LOCAL_RANK``); ConfigError when CUDA is asked for and absent."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use --device cpu")
    return torch.device("cuda", dinfo.local_rank) if cfg.device == "cuda" else torch.device("cpu")


def prepare(
    cfg: TrainConfig, data: str | Path, teacher: nn.Module, device: torch.device, cache_dir: Path, progress: bool
) -> Frozen:
    """Decode the images once, run the frozen teacher once, fit what is fitted without training, build the selector.

    Args:
        cfg: the run's config (data, selection and the teacher's name are read).
        data: the category folder.
        teacher: the frozen teacher, on ``device``.
        device: where features are computed.
        cache_dir: memmap files go here past ``data.cache_limit_mb``.
        progress: progress bars.
    """
    from training.backbones import get_spec
    from training.features import feature_set, load_readable
    from training.scoring import ChannelStats, DensityHead
    from training.selection import Selector, choose_centring
    from training.synthetic import synthesize

    splits = discover(data, cfg.data.val_fraction, cfg.seed, max_images=cfg.data.max_images)
    size = cfg.data.input_hw()
    spec = get_spec(cfg.model.backbone)
    mean, std = spec.mean, spec.std
    t_cache = time.perf_counter()
    train_np, train_samples, skipped = load_readable(
        splits.train, size, mean, std, show_progress=progress, desc="decoding train"
    )
    train_fs = feature_set(
        teacher,
        train_np,
        device,
        cache_dir=cache_dir,
        limit_mb=cfg.data.cache_limit_mb,
        show_progress=progress,
    )
    del train_np
    stats = ChannelStats(spec.channels).fit(train_fs.feats)
    frozen = Frozen(splits, train_fs, train_samples, skipped, stats)
    knn_rows = 0
    if splits.val:
        if cfg.selection.density:
            n_patches = len(train_fs) * (size[0] // 8) * (size[1] // 8)
            knn_rows = int(math.ceil(cfg.selection.knn_coreset * n_patches)) if cfg.selection.knn_coreset > 0 else 0
            wide = cfg.selection.density_aggregate
            frozen.density = DensityHead(spec.channels, size, cfg.selection.density_dims, knn_rows, wide)
            frozen.density.fit(train_fs.feats)
            if wide:
                t_wide = time.perf_counter()
                frozen.density.fit_wide(train_fs.feats)
                log.info("density head: wide Gaussian (%dx%d) in %.1f s", wide, wide, time.perf_counter() - t_wide)
            if knn_rows:
                t_knn = time.perf_counter()
                frozen.density.fit_knn(train_fs.feats, seed=cfg.seed)
                log.info("density head: kNN memory bank of %d patches in %.1f s", knn_rows, time.perf_counter() - t_knn)
        val_np, frozen.val_samples, _ = load_readable(splits.val, size, mean, std, desc="decoding validation")
        synth01, synth_masks, kinds = synthesize(
            to_unit_rgb(val_np, mean, std), cfg.selection.synthetic_per_image, cfg.seed
        )
        good_fs = feature_set(teacher, val_np, device)
        synth_fs = feature_set(teacher, from_unit_rgb(synth01, mean, std), device)
        pin = cfg.selection.pin.model_dump()
        frozen.good_fs = good_fs
        frozen.selector = Selector(
            good_fs,
            synth_fs,
            synth_masks,
            size,
            cfg.model.sigma,
            stats,
            frozen.density,
            pin,
            pixel_stride=max(1, cfg.data.image_size // 128),
            kinds=kinds,
            signal=cfg.selection.signal,
            tie_break=cfg.selection.tie_break,
            density_floor=cfg.selection.density_floor,
            bootstrap=cfg.selection.bootstrap,
            seed=cfg.seed,
        )
        if frozen.density is not None and frozen.density.aggregate:
            from training.selection import choose_wide_blend

            frozen.wide_choice = choose_wide_blend(frozen.density, frozen.selector)
        if knn_rows and frozen.density is not None:
            from training.selection import choose_knn_blend

            frozen.knn_choice = choose_knn_blend(frozen.density, frozen.selector)
        frozen.centre_choice = choose_centring(frozen.selector, cfg.selection.centre)
        log.info(
            "selection: %d good validation images + %d synthetic defects (%s), %d candidate recipes",
            len(good_fs),
            len(synth_fs),
            ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds))),
            len(frozen.selector.cands),
        )
    frozen.cache_s = time.perf_counter() - t_cache
    return frozen


def resolve_shape(cfg: TrainConfig, data: str | Path) -> TrainConfig:
    """``cfg`` with ``data.shape``, the input ``(height, width)``, set from ``data.image_size`` and ``data.aspect``
    (a copy; a config that already has a shape is returned as it is).

    ``auto`` keeps the training images' own aspect when they share one (:func:`training.data.measure_aspect`), at
    about ``image_size^2`` pixels (:func:`training.data.input_shape`): squashing kolektorsdd's 512 x 203 parts into
    a square halves their height and loses the thin cracks (``benchmarks/results/aspect.md``). Parts of mixed
    aspect stay square.
    """
    from training.data import resolve_hw

    if cfg.data.shape:
        return cfg
    side, aspect = cfg.data.image_size, cfg.data.aspect
    paths: list[Path] = []
    if aspect == "auto":
        splits = discover(data, cfg.data.val_fraction, cfg.seed, max_images=cfg.data.max_images)
        paths = [s.path for s in [*splits.train, *splits.val]]
    hw, why = resolve_hw(side, aspect, paths)
    log.info("input %d x %d px (height x width) for data.image_size %d: %s", *hw, side, why)
    out = cfg.model_copy(deep=True)
    out.data.shape = hw
    return out


def fit(
    cfg: TrainConfig,
    data: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    aux_dir: str | Path | None = None,
    show_progress: bool = True,
    label: str | None = None,
    keep_group: bool = False,
    frozen: Frozen | None = None,
) -> Path:
    """Train RD on the good images of ``data`` and write checkpoints, ``log.jsonl`` and ``selection.json``.

    Images are decoded and the frozen teacher run once (:mod:`training.features`); each step trains the OCBE and
    decoder on cached features. Every ``selection.every_steps`` the validation signal (:mod:`training.selection`)
    scores the held-out good images and synthetic defects made from them under every candidate scoring recipe; the
    best (checkpoint, recipe) is ``checkpoint_best.pt`` with the recipe under ``"scoring"``.

    ``model.projection: auto`` (the default) trains plain RD and RD++ this way and keeps the one with the higher
    signal (:mod:`training.candidates`); ``label`` names the candidate in the progress bar, ``keep_group`` leaves a
    torchrun process group up for the next candidate (a group re-created in the same processes can hang), and
    ``frozen`` is the :func:`prepare` result the candidates share (``None``: prepared here).

    The input shape is resolved first (:func:`resolve_shape`) and kept in every checkpoint's config.

    Returns:
        Path of the best checkpoint (the last one if there is no validation split).
    """
    cfg = resolve_shape(cfg, data)
    if aux_dir is not None and cfg.model.projection in ("auto", "identity"):
        raise ConfigError("--aux needs model.projection 'aux' (set automatically by 'rdedge train --aux')")
    if cfg.model.projection == "auto":  # RD-E never gets here: its config resolves 'auto' to 'identity'
        from training.candidates import fit_auto

        return fit_auto(cfg, data, out_dir, resume=resume, show_progress=show_progress)
    if cfg.model.objective == "rde":  # the teacher trains: no feature cache, its own loop
        from training.rde_train import fit_rde

        return fit_rde(cfg, data, out_dir, resume=resume, show_progress=show_progress)
    from tqdm import tqdm

    from training.scoring import PAPER_RECIPE, scoring_state

    dinfo = init_distributed(cfg.device)
    if not dinfo.is_main:
        logging.getLogger("training").setLevel(logging.WARNING)  # rank 0 logs for everyone
    device = resolve_device(cfg, dinfo)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    progress = show_progress and dinfo.is_main

    size = cfg.data.input_hw()
    model = build_model(cfg).to(device)
    if frozen is None:
        frozen = prepare(cfg, data, model.teacher, device, out / "cache", progress)
    train_fs, stats, density, good_fs, selector = (
        frozen.train_fs,
        frozen.stats,
        frozen.density,
        frozen.good_fs,
        frozen.selector,
    )

    objective = build_objective(cfg, model, aux_dir)
    optimizers = objective.parameters_groups(model, cfg)
    student = model.student()
    train_student: nn.Module = student
    if dinfo.world_size > 1:
        train_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[dinfo.local_rank] if cfg.device == "cuda" else None
        )
    n_train = len(train_fs)
    per_epoch = len(_batches(n_train, cfg.optim.batch_size, cfg.seed, 0, dinfo.rank, dinfo.world_size))
    total_steps = cfg.optim.epochs * per_epoch if cfg.optim.epochs else cfg.optim.steps

    rs = resume_from(out, cfg, model, optimizers) if resume else ResumeState()
    if rs.aux is not None and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(rs.aux)
    start_step, best_signal, best_step, history = rs.step, rs.best_signal, rs.best_step, rs.history

    split_record = split_paths(frozen.train_samples, frozen.splits.val, frozen.splits.unused)
    if dinfo.is_main:
        (out / "split.json").write_text(json.dumps(split_record, indent=1))
        (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
        log.info(
            "training %s RD (%s projection) on %d images (%d validation, %d skipped), %dx%d, batch %d, %d steps "
            "(%d a pass), %.2f M trainable parameters, device %s; cache built in %.1f s",
            cfg.model.backbone,
            cfg.model.projection,
            n_train,
            len(frozen.val_samples),
            len(frozen.skipped),
            *size,
            cfg.optim.batch_size,
            total_steps,
            per_epoch,
            n_params / 1e6,
            device,
            frozen.cache_s,
        )

    def payload(step: int, scoring: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "step": step,
            "epoch": (step - 1) // max(per_epoch, 1),
            "model": model.state_dict(),
            "aux": objective.state_dict(),
            "optimizer": [opt.state_dict() for opt in optimizers],
            "best_signal": best_signal,
            "best_step": best_step,
            "history": history,
            "scoring": scoring,
            "split": split_record,
        }

    t_start = time.perf_counter()
    sums: dict[str, float] = {}
    n_seen, t_window = 0, time.perf_counter()
    last_eval: dict[str, Any] = {}
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"training {label}" if label else "training",
        unit="step",
        disable=not progress,
    )
    step = start_step
    epoch, batches = -1, []
    student.train()
    while step < total_steps:
        e, pos = divmod(step, per_epoch)
        if e != epoch:
            epoch, batches = e, _batches(n_train, cfg.optim.batch_size, cfg.seed, e, dinfo.rank, dinfo.world_size)
        idx = batches[pos]
        images, feats = train_fs.batch(idx)
        images, feats = images.to(device, non_blocking=True), [f.to(device, non_blocking=True) for f in feats]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss, parts = objective.loss(train_student, feats, images)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step + 1}; lower optim.lr")
        loss.backward()
        for opt in optimizers:
            opt.step()
        step += 1
        n = int(idx.numel())
        n_seen += n
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * n
        window = max(time.perf_counter() - t_window, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{sums['loss'] / n_seen:.4f}",
            img_s=f"{n_seen / window:.0f}",
            signal=f"{last_eval['signal']:.3f}" if "signal" in last_eval else "-",
        )
        due = step % cfg.selection.every_steps == 0 or step == total_steps
        elapsed = time.perf_counter() - t_start
        out_of_time = cfg.optim.max_minutes is not None and elapsed > cfg.optim.max_minutes * 60
        if not (due or out_of_time):
            continue
        stats_window = {k: v / max(n_seen, 1) for k, v in sums.items()}
        stats_window["images_per_s"] = n_seen / window
        stats_window["steps_per_s"] = n_seen / max(cfg.optim.batch_size, 1) / window
        if dinfo.is_main:
            record: dict[str, Any] = {"step": step, "epoch": step / max(per_epoch, 1), **stats_window}
            scoring = None
            if selector is not None and good_fs is not None:
                t_eval = time.perf_counter()
                ev = selector.evaluate(student)
                record["val_loss"] = validation_loss(student, good_fs)
                record.update(signal=ev.best_signal, recipe=ev.best.name(), eval_s=time.perf_counter() - t_eval)
                improved = ev.best_signal > best_signal + 1e-9
                record["best"] = improved
                history.append({"step": step, "signal": ev.best_signal, "recipe": ev.best.name()})
                last_eval = record
                if improved:
                    best_signal, best_step = ev.best_signal, step
                    info = {"signal": ev.best_signal, "step": step, "candidates": ev.results, "tie": ev.tie,
                            "density_knn": frozen.knn_choice, "density_wide": frozen.wide_choice,
                            "centre": frozen.centre_choice}  # fmt: skip
                    scoring = scoring_state(ev.best, stats, density, info)
                    save_checkpoint(out / BEST, payload(step, scoring))
                student.train()
            save_checkpoint(out / LAST, payload(step, None))
            if selector is None:
                save_checkpoint(out / BEST, payload(step, None))
            record["elapsed_s"] = elapsed
            _log_jsonl(out / "log.jsonl", record)
            log.info(
                "step %d/%d loss %.4f%s  %.1f img/s %.2f steps/s  %.0fs",
                step,
                total_steps,
                stats_window["loss"],
                f" signal {record['signal']:.4f} [{record['recipe']}]{' *' if record.get('best') else ''}"
                if "signal" in record
                else "",
                stats_window["images_per_s"],
                stats_window["steps_per_s"],
                elapsed,
            )
        sums, n_seen, t_window = {}, 0, time.perf_counter()
        stop = [out_of_time]
        if dinfo.world_size > 1:
            dist.broadcast_object_list(stop, src=0)  # every rank must leave the loop at the same step
        if stop[0]:
            log.info("optim.max_minutes=%.1f reached after step %d", cfg.optim.max_minutes, step)
            break
    bar.close()
    if dist.is_initialized():
        dist.barrier()
        if not keep_group:
            dist.destroy_process_group()
    if dinfo.is_main and not (out / BEST).is_file() and (out / LAST).is_file():
        import shutil

        shutil.copyfile(out / LAST, out / BEST)  # nothing was evaluated (e.g. resumed past the end)
    if dinfo.is_main:
        train_s = time.perf_counter() - t_start
        summary = {
            "best_step": best_step,
            "best_signal": best_signal if math.isfinite(best_signal) else None,
            "steps": step,
            "train_s": train_s,
            "cache_s": frozen.cache_s,
            "history": history,
            "paper_recipe": PAPER_RECIPE.name(),
            "density_knn": frozen.knn_choice,
            "density_wide": frozen.wide_choice,
            "centre": frozen.centre_choice,
        }
        if (out / BEST).is_file():
            best_ckpt = load_checkpoint(out / BEST)
            if best_ckpt.get("scoring"):
                summary["chosen"] = best_ckpt["scoring"]["recipe"]
                summary["candidates"] = best_ckpt["scoring"]["info"].get("candidates", [])
                summary["tie"] = best_ckpt["scoring"]["info"].get("tie")
        (out / "selection.json").write_text(json.dumps(summary, indent=1))
        log.info(
            "done in %.0f s (+%.0f s cache): best signal %.4f at step %d -> %s",
            train_s,
            frozen.cache_s,
            best_signal,
            best_step,
            out / BEST,
        )
    return out / BEST


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, ignoring the settings that a resume may extend."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in ("optim.steps", "optim.epochs", "optim.max_minutes"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train`` (used by torchrun): the same arguments as ``rdedge train``."""
    from training.cli import train_command, train_parser

    args = train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
