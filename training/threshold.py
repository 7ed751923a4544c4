"""OK/NG threshold from defect-free images alone, plus the F1-optimal one when labelled defects exist.

Rule ``quantile+margin`` (documented in the README and stored in the bundle manifest)::

    q   = 1 - target_false_alarm_rate            (default 0.99: about 1 false alarm per 100 good parts)
    t   = Q_q(good_scores) + margin * (Q_q(good_scores) - median(good_scores))

``Q_q`` is the empirical quantile (linear interpolation) of the image scores of the validation images that training
kept aside from train/good. The margin (default 0.1) widens the threshold by a tenth of the spread above the median,
a hedge for a small validation set whose top quantile underestimates the population's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from training.metrics import f1_max


@dataclass(frozen=True)
class Threshold:
    value: float
    rule: str
    target_false_alarm_rate: float
    margin: float
    n_images: int
    stats: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def calibrate_threshold(
    good_scores: np.ndarray, target_false_alarm_rate: float = 0.01, margin: float = 0.1
) -> Threshold:
    """Threshold on defect-free scores; raises ValueError when there are none."""
    s = np.asarray(good_scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("threshold calibration needs at least one defect-free validation image")
    if not 0.0 < target_false_alarm_rate < 1.0:
        raise ValueError(f"target_false_alarm_rate must be in (0, 1), got {target_false_alarm_rate}")
    q = 1.0 - target_false_alarm_rate
    qv, med = float(np.quantile(s, q)), float(np.median(s))
    value = qv + margin * max(qv - med, 0.0)
    stats = {
        "n": float(s.size),
        "min": float(s.min()),
        "median": med,
        "mean": float(s.mean()),
        "std": float(s.std()),
        "max": float(s.max()),
        f"q{q:g}": qv,
        "val_false_alarm_rate": float((s >= value).mean()),
    }
    return Threshold(value, "quantile+margin", target_false_alarm_rate, margin, int(s.size), stats)


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """F1-optimal threshold on labelled images (reported, never chosen on the test set by rdedge itself)."""
    f1, thr, p, r = f1_max(scores, labels)
    return {"threshold": thr, "f1": f1, "precision": p, "recall": r}
