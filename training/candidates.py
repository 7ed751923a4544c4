"""The default student: plain RD and RD++ both trained, the one the validation signal rates higher kept.

``model.projection: auto`` (the default) trains one student per entry of :data:`AUTO_PROJECTIONS`, each into its
own folder ``RUN/candidates/<projection>/`` with the same config otherwise (same images, split, synthetic defects,
seed and budget; what no student changes is made once by :func:`training.train.prepare` and shared), and copies
the winner to ``RUN``: ``checkpoint_best.pt`` (its config names the concrete projection, so export and evaluation
need nothing new), ``selection.json`` and ``split.json``; ``log.jsonl`` holds every candidate's evaluations, each
tagged with its projection.

**Why these two.** On the shared sets the validation signal could not see kolektorsdd's over-generalisation within
one student, but the RD++ student (projection layers trained against simplex-noise pseudo-anomalies) tested higher
there at the same budget (3 seeds, 128 px, RD scoring only: image AUROC 0.747 +- 0.002 against 0.733 +- 0.021) and
level on magnetic_tile (0.896 against 0.897), and the signal rated it higher on both
(``benchmarks/results/rde_ablation.json``). Which student a part needs is a property of the part, so it is chosen
per run by the same signal that chooses the checkpoint and the scoring recipe, never by the test set.

**The rule.** The candidate with the higher best signal wins; an exact tie or a run without a validation split keeps
plain RD (without a split there is no signal, and only RD is trained). The signal, step, recipe and train time of
every candidate are recorded in ``selection.json`` under ``projection`` and in the checkpoint's scoring info, which
export copies into the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.errors import CheckpointError

log = logging.getLogger(__name__)

#: What ``model.projection: auto`` trains, simplest first (an exact tie keeps the earlier one).
AUTO_PROJECTIONS: tuple[str, ...] = ("identity", "rdpp")
#: Names in logs and records.
LABELS = {"identity": "RD", "rdpp": "RD++"}
CANDIDATES_DIR = "candidates"


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def fit_auto(
    cfg: TrainConfig, data: str | Path, out_dir: str | Path, resume: bool = False, show_progress: bool = True
) -> Path:
    """Train every :data:`AUTO_PROJECTIONS` student and keep the one with the higher validation signal.

    Args:
        cfg: the run's config with ``model.projection == "auto"``.
        data: the category folder.
        out_dir: the run folder; candidates go to ``out_dir/candidates/<projection>/``.
        resume: continue each candidate from its own ``checkpoint_last.pt`` (one that never started starts fresh;
            one that finished is kept as it is).
        show_progress: progress bars.

    Returns:
        ``out_dir/checkpoint_best.pt`` (the winner's).
    """
    from training.backbones import build_teacher
    from training.train import fit, init_distributed, prepare, resolve_device

    out = Path(out_dir)
    if resume and not any((out / CANDIDATES_DIR / p / LAST).is_file() for p in AUTO_PROJECTIONS):
        raise CheckpointError(f"--resume: no {CANDIDATES_DIR}/<student>/{LAST} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    # What no student changes (decoded images, teacher features, density head, synthetic defects) is made once.
    device = resolve_device(cfg, init_distributed(cfg.device))
    m = cfg.model
    teacher = build_teacher(m.backbone, m.teacher_weights, m.pretrained).to(device)
    t0 = time.perf_counter()
    frozen = prepare(cfg, data, teacher, device, out / "cache", show_progress and _is_main())
    del teacher
    # Every rank decides the same way, before training: without a validation split there is no signal to choose
    # by, so only plain RD trains.
    has_val = bool(frozen.splits.val)
    projections = AUTO_PROJECTIONS if has_val else AUTO_PROJECTIONS[:1]
    if not has_val:
        log.info("no validation split: training %s only (no signal to choose a student by)", LABELS[projections[0]])
    rows: dict[str, dict[str, Any]] = {}
    for i, proj in enumerate(projections):
        sub = out / CANDIDATES_DIR / proj
        sub_cfg = cfg.model_copy(deep=True)
        sub_cfg.model.projection = proj  # type: ignore[assignment]
        log.info("student candidate %s (%s): %s", LABELS[proj], proj, sub)
        last = i == len(projections) - 1
        sub_resume = resume and (sub / LAST).is_file()
        fit(
            sub_cfg,
            data,
            sub,
            resume=sub_resume,
            show_progress=show_progress,
            label=proj,
            keep_group=not last,
            frozen=frozen,
        )
        if not _is_main():
            continue
        sel = json.loads((sub / "selection.json").read_text())
        rows[proj] = {
            "label": LABELS[proj],
            "best_signal": sel.get("best_signal"),
            "best_step": sel.get("best_step"),
            "steps": sel.get("steps"),
            "train_s": sel.get("train_s"),
            "recipe": _recipe_name(sel),
        }
    best = out / BEST
    if not _is_main():
        return best
    chosen = _choose(rows)
    record = {
        "rule": "higher best validation signal (synthetic defects on held-out good images); "
        "an exact tie or no validation split keeps plain RD",
        "chosen": chosen,
        "candidates": rows,
        "total_train_s": time.perf_counter() - t0,
    }
    _promote(out, out / CANDIDATES_DIR / chosen, record)
    log.info(
        "student: %s chosen (%s)",
        LABELS[chosen],
        ", ".join(
            f"{r['label']} signal {r['best_signal']:.4f}" if r["best_signal"] is not None else f"{r['label']} n/a"
            for r in rows.values()
        ),
    )
    return best


def _recipe_name(sel: dict[str, Any]) -> str | None:
    chosen = sel.get("chosen")
    if not chosen:
        return None
    from training.scoring import ScoreRecipe

    return ScoreRecipe.from_dict(chosen).name()


def _choose(rows: dict[str, dict[str, Any]]) -> str:
    """The projection with the highest best signal (the first on an exact tie; ``None`` signals rank last)."""
    best, best_signal = next(iter(rows)), float("-inf")
    for proj, row in rows.items():
        if row["best_signal"] is not None and row["best_signal"] > best_signal:  # strictly: a tie keeps the first
            best, best_signal = proj, row["best_signal"]
    return best


def _promote(out: Path, winner: Path, record: dict[str, Any]) -> None:
    """Copy the winner's best checkpoint and records to the run folder, with the choice written into both."""
    ckpt = load_checkpoint(winner / BEST)
    if ckpt.get("scoring"):
        ckpt["scoring"].setdefault("info", {})["projection"] = record
    save_checkpoint(out / BEST, ckpt)
    sel = json.loads((winner / "selection.json").read_text())
    sel["projection"] = record
    (out / "selection.json").write_text(json.dumps(sel, indent=1))
    shutil.copyfile(winner / "split.json", out / "split.json")
    shutil.copyfile(winner / "config.json", out / "config.json")
    with open(out / "log.jsonl", "w", encoding="utf-8") as f:
        for proj in record["candidates"]:
            path = out / CANDIDATES_DIR / proj / "log.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    f.write(json.dumps({"projection": proj, **json.loads(line)}) + "\n")
