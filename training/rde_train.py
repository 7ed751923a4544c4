"""RD-E's training loop (``rdedge train --objective rde``): a teacher step, then a student step, every batch.

The teacher trains, so its features cannot be cached as plain RD's loop does (:mod:`training.train`); every step
runs the frozen expert, the teacher (train mode, with grad) and the teacher again (eval, no grad) on the batch and
its synthetic anomalies (:mod:`training.rde_synth`):

1. teacher step: ``E(x), E(x~)`` without grad, ``T(x), T(x~)`` with grad -> :func:`training.rde_loss.teacher_loss`
   -> Adam (``extra.rde.teacher_lr``, ``extra.rde.teacher_betas``; paper 1e-4, (0.5, 0.999)).
2. student step: the teacher in eval / no grad gives ``T(x), T(x~)``; the student reconstructs from each ->
   :func:`training.rde_loss.student_loss` -> Adam (``optim.lr``, ``optim.betas``; paper 5e-3, (0.5, 0.999)).

Selection: the same defect-aware validation signal as RD (:class:`training.selection.Selector`: held-out good images
and synthetic defects made from them, never the test set; the paper selects on the test set). Because the teacher
moves, each evaluation recomputes the features of the training images (channel statistics, density head) and of the
validation sets with the current teacher before scoring; the chosen recipe is stored with statistics of *that*
teacher. Checkpoints: the usual keys (``model`` = tuned teacher + OCBE + decoder, exactly what export reads) and the
frozen expert under ``aux`` (training-only: resuming needs it, export refuses anything from ``aux``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.build import build_model
from training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import discover
from training.errors import ConfigError
from training.rde import RDEModel, make_expert
from training.rde_loss import student_loss, teacher_loss
from training.rde_synth import PerlinAnomaly
from training.train import (
    ResumeState,
    _batches,
    _log_jsonl,
    from_unit_rgb,
    resume_from,
    seed_everything,
    split_paths,
    to_unit_rgb,
    validation_loss,
)

log = logging.getLogger(__name__)


def make_optimizers(model: RDEModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """``[teacher Adam, student Adam]`` (the teacher's parameters are made trainable here)."""
    rde = cfg.extra.rde
    for p in model.teacher.parameters():
        p.requires_grad_(True)
    return [
        torch.optim.Adam(model.teacher.parameters(), lr=rde.teacher_lr, betas=rde.teacher_betas),
        torch.optim.Adam(model.student_parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas),
    ]


def train_step(
    model: RDEModel,
    expert: nn.Module,
    student: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    x: Tensor,
    anomaly: PerlinAnomaly,
) -> tuple[float, dict[str, float]]:
    """One RD-E step on a normalised batch ``x (B, 3, H, W)``: teacher step, then student step.

    Returns:
        ``(teacher loss + student loss, per-term values)``.

    Raises:
        FloatingPointError: a loss is not finite.
    """
    opt_t, opt_s = optimizers
    x_t, mask = anomaly(x)
    with torch.no_grad():
        e_x, e_xt = expert(x), expert(x_t)

    model.teacher.train()
    opt_t.zero_grad(set_to_none=True)
    lt, parts = teacher_loss(model.teacher(x), model.teacher(x_t), e_x, e_xt, mask)
    if not torch.isfinite(lt):
        raise FloatingPointError(f"teacher loss became {float(lt)}; lower extra.rde.teacher_lr")
    lt.backward()
    opt_t.step()

    model.teacher.eval()
    with torch.no_grad():
        t_x, t_xt = model.teacher(x), model.teacher(x_t)
    student.train()
    opt_s.zero_grad(set_to_none=True)
    ls, s_parts = student_loss(student(*t_x), student(*t_xt), t_x, e_x)
    if not torch.isfinite(ls):
        raise FloatingPointError(f"student loss became {float(ls)}; lower optim.lr")
    ls.backward()
    opt_s.step()
    return float(lt.detach()) + float(ls.detach()), {
        "teacher": float(lt.detach()),
        "student": float(ls.detach()),
        **parts,
        **s_parts,
    }


class RDESelection:
    """The validation signal for a moving teacher: features recomputed with the current teacher at each evaluation.

    Args:
        cfg: the run's config (selection settings, sigma, size).
        train_np: preprocessed training images ``(N, 3, H, W)`` (channel statistics, density head).
        val_np: preprocessed held-out good images.
        device: where the teacher runs.
    """

    def __init__(self, cfg: TrainConfig, train_np: np.ndarray, val_np: np.ndarray, device: torch.device) -> None:
        from training.backbones import get_spec
        from training.synthetic import synthesize

        self.cfg, self.device = cfg, device
        spec = get_spec(cfg.model.backbone)
        self.channels = spec.channels
        self.size = cfg.data.input_hw()
        self.train_np, self.val_np = train_np, val_np
        synth01, self.synth_masks, self.kinds = synthesize(
            to_unit_rgb(val_np, spec.mean, spec.std), cfg.selection.synthetic_per_image, cfg.seed
        )
        self.synth_np = from_unit_rgb(synth01, spec.mean, spec.std)

    def evaluate(self, teacher: nn.Module, student: nn.Module) -> tuple[Any, Any, Any, float, Any]:
        """Score ``student`` on the current ``teacher``'s features.

        Returns:
            ``(Evaluation, ChannelStats, DensityHead | None, validation loss, good FeatureSet)``.
        """
        from training.features import feature_set
        from training.scoring import ChannelStats, DensityHead
        from training.selection import Selector

        teacher.eval()
        train_fs = feature_set(teacher, self.train_np, self.device)
        stats = ChannelStats(self.channels).fit(train_fs.feats)
        density = None
        if self.cfg.selection.density:
            density = DensityHead(self.channels, self.size, self.cfg.selection.density_dims).fit(train_fs.feats)
        del train_fs
        good_fs = feature_set(teacher, self.val_np, self.device)
        synth_fs = feature_set(teacher, self.synth_np, self.device)
        selector = Selector(
            good_fs,
            synth_fs,
            self.synth_masks,
            self.size,
            self.cfg.model.sigma,
            stats,
            density,
            self.cfg.selection.pin.model_dump(),
            pixel_stride=max(1, self.cfg.data.image_size // 128),
            kinds=self.kinds,
            signal=self.cfg.selection.signal,
            tie_break=self.cfg.selection.tie_break,
            density_floor=self.cfg.selection.density_floor,
            bootstrap=self.cfg.selection.bootstrap,
            seed=self.cfg.seed,
        )
        ev = selector.evaluate(student)
        return ev, stats, density, validation_loss(student, good_fs), good_fs


def fit_rde(
    cfg: TrainConfig,
    data: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train RD-E on the good images of ``data``; writes checkpoints, ``log.jsonl`` and ``selection.json``.

    Returns:
        Path of the best checkpoint (by the validation signal; the last one without a validation split).
    """
    from tqdm import tqdm

    from training.backbones import get_spec
    from training.features import load_readable
    from training.scoring import PAPER_RECIPE, scoring_state

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("model.objective rde: multi-process training is not supported (run one process)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use --device cpu")
    device = torch.device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    splits = discover(data, cfg.data.val_fraction, cfg.seed, max_images=cfg.data.max_images)
    size = cfg.data.input_hw()
    spec = get_spec(cfg.model.backbone)
    model = build_model(cfg)
    assert isinstance(model, RDEModel)
    expert = make_expert(model.teacher)  # the ImageNet teacher, before any tuning
    model.to(device)
    expert.to(device)
    t_load = time.perf_counter()
    train_np, train_samples, skipped = load_readable(
        splits.train, size, spec.mean, spec.std, show_progress=show_progress, desc="decoding train"
    )
    train_x = torch.from_numpy(train_np)
    selection: RDESelection | None = None
    val_samples: list[Any] = []
    if splits.val:
        val_np, val_samples, _ = load_readable(splits.val, size, spec.mean, spec.std, desc="decoding validation")
        selection = RDESelection(cfg, train_np, val_np, device)
        log.info(
            "selection: %d good validation images + %d synthetic defects (%s)",
            len(val_samples),
            len(selection.synth_masks),
            ", ".join(f"{k} {selection.kinds.count(k)}" for k in sorted(set(selection.kinds))),
        )
    load_s = time.perf_counter() - t_load

    optimizers = make_optimizers(model, cfg)
    student = model.student()
    anomaly = PerlinAnomaly(cfg.data.input_hw(), spec.mean, spec.std, cfg.extra.rde, cfg.seed)
    n_train = len(train_x)
    per_epoch = len(_batches(n_train, cfg.optim.batch_size, cfg.seed, 0, 0, 1))
    total_steps = cfg.optim.epochs * per_epoch if cfg.optim.epochs else cfg.optim.steps

    rs = resume_from(out, cfg, model, optimizers) if resume else ResumeState()
    if rs.aux is not None:
        expert.load_state_dict(rs.aux["expert"])
    start_step, best_signal, best_step, history = rs.step, rs.best_signal, rs.best_step, rs.history

    split_record = split_paths(train_samples, splits.val, splits.unused)
    (out / "split.json").write_text(json.dumps(split_record, indent=1))
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    n_t = sum(p.numel() for p in model.teacher.parameters())
    n_s = sum(p.numel() for p in model.student_parameters())
    log.info(
        "training %s RD-E (gii %s) on %d images (%d validation, %d skipped), %dx%d, batch %d, %d steps (%d a pass), "
        "teacher %.2f M + student %.2f M trainable parameters, device %s; images loaded in %.1f s",
        cfg.model.backbone,
        cfg.extra.rde.gii,
        n_train,
        len(val_samples),
        len(skipped),
        *size,
        cfg.optim.batch_size,
        total_steps,
        per_epoch,
        n_t / 1e6,
        n_s / 1e6,
        device,
        load_s,
    )

    def payload(step: int, scoring: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "step": step,
            "epoch": (step - 1) // max(per_epoch, 1),
            "model": model.state_dict(),
            "aux": {"expert": expert.state_dict()},  # training-only; export refuses these keys
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
    last_signal: float | None = None
    bar = tqdm(total=total_steps, initial=start_step, desc="training RD-E", unit="step", disable=not show_progress)
    step = start_step
    epoch, batches = -1, []
    while step < total_steps:
        e, pos = divmod(step, per_epoch)
        if e != epoch:
            epoch, batches = e, _batches(n_train, cfg.optim.batch_size, cfg.seed, e, 0, 1)
        idx = batches[pos]
        x = train_x[idx].to(device, non_blocking=True)
        try:
            loss, parts = train_step(model, expert, student, optimizers, x, anomaly)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} (step {step + 1})") from None
        step += 1
        n = int(idx.numel())
        n_seen += n
        sums["loss"] = sums.get("loss", 0.0) + loss * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * n
        window = max(time.perf_counter() - t_window, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{sums['loss'] / n_seen:.4f}",
            img_s=f"{n_seen / window:.0f}",
            signal=f"{last_signal:.3f}" if last_signal is not None else "-",
        )
        due = step % cfg.selection.every_steps == 0 or step == total_steps
        elapsed = time.perf_counter() - t_start
        out_of_time = cfg.optim.max_minutes is not None and elapsed > cfg.optim.max_minutes * 60
        if not (due or out_of_time):
            continue
        record: dict[str, Any] = {"step": step, "epoch": step / max(per_epoch, 1)}
        record.update({k: v / max(n_seen, 1) for k, v in sums.items()})
        record["images_per_s"] = n_seen / window
        if selection is not None:
            t_eval = time.perf_counter()
            ev, stats, density, val_loss, _ = selection.evaluate(model.teacher, student)
            record.update(val_loss=val_loss, signal=ev.best_signal, recipe=ev.best.name())
            record["eval_s"] = time.perf_counter() - t_eval
            improved = ev.best_signal > best_signal + 1e-9
            record["best"] = improved
            history.append({"step": step, "signal": ev.best_signal, "recipe": ev.best.name()})
            last_signal = ev.best_signal
            if improved:
                best_signal, best_step = ev.best_signal, step
                info = {"signal": ev.best_signal, "step": step, "candidates": ev.results, "tie": ev.tie}
                save_checkpoint(out / BEST, payload(step, scoring_state(ev.best, stats, density, info)))
        save_checkpoint(out / LAST, payload(step, None))
        if selection is None:
            save_checkpoint(out / BEST, payload(step, None))
        record["elapsed_s"] = elapsed
        _log_jsonl(out / "log.jsonl", record)
        log.info(
            "step %d/%d loss %.4f (teacher %.4f, student %.4f)%s  %.1f img/s  %.0fs",
            step,
            total_steps,
            record["loss"],
            record["teacher"],
            record["student"],
            f" signal {record['signal']:.4f} [{record['recipe']}]{' *' if record.get('best') else ''}"
            if "signal" in record
            else "",
            record["images_per_s"],
            elapsed,
        )
        sums, n_seen, t_window = {}, 0, time.perf_counter()
        if out_of_time:
            log.info("optim.max_minutes=%.1f reached after step %d", cfg.optim.max_minutes, step)
            break
    bar.close()
    if not (out / BEST).is_file() and (out / LAST).is_file():
        import shutil

        shutil.copyfile(out / LAST, out / BEST)  # nothing was evaluated (e.g. resumed past the end)
    train_s = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "objective": "rde",
        "gii": cfg.extra.rde.gii,
        "best_step": best_step,
        "best_signal": best_signal if math.isfinite(best_signal) else None,
        "steps": step,
        "train_s": train_s,
        "cache_s": load_s,
        "history": history,
        "paper_recipe": PAPER_RECIPE.name(),
    }
    if (out / BEST).is_file():
        best_ckpt = load_checkpoint(out / BEST)
        if best_ckpt.get("scoring"):
            summary["chosen"] = best_ckpt["scoring"]["recipe"]
            summary["candidates"] = best_ckpt["scoring"]["info"].get("candidates", [])
            summary["tie"] = best_ckpt["scoring"]["info"].get("tie")
    (out / "selection.json").write_text(json.dumps(summary, indent=1))
    log.info("done in %.0f s: best signal %.4f at step %d -> %s", train_s, best_signal, best_step, out / BEST)
    return out / BEST
