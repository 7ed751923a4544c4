"""Evaluation on the test set: image AUROC, F1-max, pixel AUROC, AUPRO, overall and per defect type.

The test set is only ever evaluated: the checkpoint was chosen on validation loss and the operating threshold here
comes from the defect-free validation split (:mod:`training.threshold`). F1-max is reported as the usual
threshold-free figure of merit, and the test precision/recall at the validation threshold shows what a line would see.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.build import load_model
from training.data import ImageDataset, Sample, calibration_samples, discover
from training.metrics import aupro, auroc, f1_max
from training.model import ReverseDistillation
from training.scoring import Scoring, build_scoring
from training.threshold import calibrate_threshold
from training.train import collate

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Per-image scores ``(N,)``, maps ``(N, H, W)`` (or None), labels, defect names and masks ``(N, H, W)``."""

    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray | None
    masks: np.ndarray | None


@torch.no_grad()
def predict(
    model: ReverseDistillation,
    scoring: Scoring,
    samples: list[Sample],
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int = 16,
    keep_maps: bool = True,
    show_progress: bool = False,
) -> Predictions:
    """Score ``samples``; unreadable images are errors here (naming the path), never silently skipped."""
    from tqdm import tqdm

    # Pixel metrics need a mask for every defective image; a set with image labels only has none.
    defective = [s for s in samples if s.label == 1]
    with_masks = keep_maps and bool(defective) and all(s.mask is not None for s in defective)
    ds = ImageDataset(samples, size, mean, std, skip_unreadable=False, with_masks=with_masks)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval()
    scoring = scoring.to(device)
    scores, maps, masks = [], [], []
    for batch in tqdm(loader, desc="scoring", unit="batch", disable=not show_progress, leave=False):
        feats, recon = model(batch["image"].to(device))
        amap, score = scoring(feats, recon)
        scores.append(score.cpu().numpy())
        if keep_maps:
            maps.append(amap[:, 0].cpu().numpy().astype(np.float32))
        if with_masks:
            masks.append(batch["mask"].numpy())
    return Predictions(
        samples,
        np.concatenate(scores),
        np.concatenate(maps) if keep_maps else None,
        np.concatenate(masks) if with_masks else None,
    )


def compute_metrics(pred: Predictions) -> dict[str, Any]:
    """Overall and per-defect-type metrics."""
    labels = np.array([s.label for s in pred.samples])
    defects = np.array([s.defect for s in pred.samples])
    f1, thr, p, r = f1_max(pred.scores, labels)
    out: dict[str, Any] = {
        "n_images": int(labels.size),
        "n_defective": int(labels.sum()),
        "image_auroc": auroc(pred.scores, labels),
        "image_f1_max": f1,
        "f1_max_threshold": thr,
        "f1_max_precision": p,
        "f1_max_recall": r,
    }
    if pred.masks is not None and pred.maps is not None:
        out["pixel_auroc"] = auroc(pred.maps, pred.masks)
        out["aupro"] = aupro(pred.maps, pred.masks)
    else:
        out["pixel_auroc"] = out["aupro"] = None  # image labels only: no masks, pixel metrics n/a
    per: dict[str, dict[str, float]] = {}
    good = defects == "good"
    for d in sorted(set(defects.tolist()) - {"good"}):
        sel = good | (defects == d)
        m: dict[str, float] = {
            "n": int((defects == d).sum()),
            "image_auroc": auroc(pred.scores[sel], labels[sel]),
            "image_f1_max": f1_max(pred.scores[sel], labels[sel])[0],
        }
        if pred.masks is not None and pred.maps is not None:
            m["pixel_auroc"] = auroc(pred.maps[sel], pred.masks[sel])
            m["aupro"] = aupro(pred.maps[sel], pred.masks[sel])
        per[d] = m
    out["per_defect"] = per
    return out


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Test-set confusion at a threshold that was NOT chosen on the test set."""
    ng = scores >= threshold
    y = labels.astype(bool)
    tp, fp = int((ng & y).sum()), int((ng & ~y).sum())
    return {
        "threshold": float(threshold),
        "false_alarm_rate": fp / max(int((~y).sum()), 1),
        "recall": tp / max(int(y.sum()), 1),
        "precision": tp / max(tp + fp, 1),
    }


def format_table(metrics: dict[str, Any]) -> str:
    keys = ["image_auroc", "image_f1_max", "pixel_auroc", "aupro"]
    head = f"{'':<14}" + "".join(f"{k:>14}" for k in keys)
    rows = [("overall", metrics)] + sorted(metrics["per_defect"].items())
    lines = [head]
    for name, m in rows:
        cells = "".join(f"{m[k]:>14.4f}" if m.get(k) is not None else f"{'n/a':>14}" for k in keys)
        lines.append(f"{name:<14}" + cells)
    return "\n".join(lines)


def evaluate(
    run: str | Path,
    data: str | Path,
    report_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a run on the test split of ``data``; writes ``metrics.json`` (run folder and report) and a report."""
    from training.backbones import get_spec

    model, cfg, ckpt = load_model(run)
    dev = torch.device(device)
    model.to(dev)
    spec = get_spec(cfg.model.backbone)
    size = cfg.data.input_hw()
    splits = discover(data, cfg.data.val_fraction, cfg.seed, need_test=True, max_images=cfg.data.max_images)
    scoring = build_scoring(ckpt.get("scoring"), spec.channels, size, cfg.model.sigma)
    test = predict(model, scoring, splits.test, size, spec.mean, spec.std, dev, batch_size, True, show_progress)
    metrics = compute_metrics(test)
    labels = np.array([s.label for s in test.samples])
    if splits.val:
        good = calibration_samples(splits.val, splits.unused)
        val = predict(model, scoring, good, size, spec.mean, spec.std, dev, batch_size, keep_maps=False)
        thr = calibrate_threshold(val.scores)
        metrics["validation_threshold"] = {
            **thr.to_dict(),
            "source": f"validation split (n={len(splits.val)}) + train/good images max_images left out "
            f"(n={len(good) - len(splits.val)})",
        }
        metrics["at_validation_threshold"] = operating_point(test.scores, labels, thr.value)
    metrics["run"] = str(run)
    metrics["data"] = str(data)
    metrics["epoch"] = int(ckpt["epoch"]) + 1
    metrics["step"] = int(ckpt.get("step", 0))
    metrics["recipe"] = scoring.recipe.name()
    metrics["backbone"] = cfg.model.backbone
    metrics["image_size"] = cfg.data.image_size
    metrics["input_hw"] = list(size)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if report_dir is not None:
        from training.report import write_report

        write_report(Path(report_dir), metrics, test, spec.mean, spec.std, size)
        (Path(report_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
