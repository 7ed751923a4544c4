"""Anomaly-detection metrics in numpy: AUROC, F1-max, AUPRO. Fast enough for tens of millions of pixels."""

from __future__ import annotations

import cv2
import numpy as np


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with ties grouped, like scikit-learn's ``roc_curve(drop_intermediate=False)``."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; ``nan`` when only one class is present."""
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """Best F1 over all thresholds: ``(f1, threshold, precision, recall)`` (a score >= threshold is NG)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if not labels.any():
        return float("nan"), float("nan"), float("nan"), float("nan")
    _, tpr, thr = roc_curve(scores, labels)
    tp = tpr[1:] * labels.sum()
    order = np.sort(scores)[::-1]
    predicted = np.searchsorted(-order, -thr[1:], side="right")  # how many scores >= threshold
    precision = tp / np.maximum(predicted, 1)
    recall = tpr[1:]
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[1:][i]), float(precision[i]), float(recall[i])


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by it (MVTec AD / anomalib).

    Every connected defect region counts equally: at each threshold PRO is the mean, over regions, of the share of
    the region's pixels above the threshold; FPR is the share of defect-free pixels (over the whole set) above it.
    Computed exactly over all thresholds with one sort.

    Args:
        maps: anomaly maps ``(N, H, W)``.
        masks: bool ground truth ``(N, H, W)``.
    """
    maps = np.asarray(maps, np.float32)
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(maps.shape, np.float64)  # per pixel: 1/|region| inside a region, 0 outside
    n_regions = 0
    for i in range(masks.shape[0]):
        if not masks[i].any():
            continue
        n, lab = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8)
        sizes = np.bincount(lab.ravel())
        for r in range(1, n):
            weights[i][lab == r] = 1.0 / sizes[r]
        n_regions += n - 1
    normal = ~masks
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return float("nan")
    s = maps.ravel()
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    pro_inc = weights.ravel()[order] / n_regions
    fpr_inc = normal.ravel()[order] / n_normal
    distinct = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]  # last index of each tied score
    pro = np.r_[0.0, np.cumsum(pro_inc)[distinct]]
    fpr = np.r_[0.0, np.cumsum(fpr_inc)[distinct]]
    # integrate PRO(FPR) from 0 to fpr_limit, interpolating at the limit
    j = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if j < fpr.size:
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / max(x1 - x0, 1e-12)
        fpr = np.r_[fpr[:j], fpr_limit]
        pro = np.r_[pro[:j], y_lim]
    return float(np.trapezoid(pro, fpr) / fpr_limit)
