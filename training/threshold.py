"""OK/NG threshold from defect-free images alone, plus the F1-optimal one when labelled defects exist.

Rules (the default first; the name and statistics are stored in the bundle manifest)::

    q   = 1 - target_false_alarm_rate                  (default 0.99: about 1 false alarm per 100 good parts)
    quantile+margin:    t = Q_q(good) + margin * (Q_q(good) - median(good))         (margin 0.1)
    normal-prediction:  t = mean + t_{q, n-1} * sd * sqrt(1 + 1/n)                 (Student's t prediction bound)
    max-of-both:        t = max(quantile+margin, normal-prediction)                  (the default)

``Q_q`` is the empirical quantile (linear interpolation) of the image scores of the defect-free calibration images
(the validation split training kept aside, then the train/good images ``max_images`` left out:
:func:`training.data.calibration_samples`). **Why the maximum of two**: the empirical quantile of 20 images cannot
reach past their largest score, so it promises 1% and gives about 4% even on normal scores; the normal bound
extrapolates but underrates heavy tails once many images are in. Judged on defect-free images no run had seen
(``benchmarks/results/calibration.md``, three shared sets, 128 px) the maximum was never worse than either rule.
Every threshold also records ``val_far_upper_95``: the largest false-alarm rate its images can still allow
(:func:`far_upper_bound`); 20 images allow 13.9%, whatever the rule.
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


#: The rules :func:`calibrate_threshold` knows, the default first.
RULES = ("max-of-both", "quantile+margin", "normal-prediction")


def normal_prediction_bound(s: np.ndarray, q: float) -> float:
    """Upper ``q`` prediction bound for one more sample of a normal population seen through ``s``:
    ``mean + t_{q, n-1} * sd * sqrt(1 + 1/n)`` (Student's t: the bound accounts for the mean and spread themselves
    being estimated from ``n`` images). Needs ``n >= 2``."""
    from scipy.stats import t as student_t

    n = s.size
    if n < 2:
        raise ValueError("the normal-prediction rule needs at least two defect-free validation images")
    return float(s.mean() + student_t.ppf(q, n - 1) * s.std(ddof=1) * np.sqrt(1.0 + 1.0 / n))


def far_upper_bound(alarms: int, n: int, confidence: float = 0.95) -> float:
    """The largest false-alarm rate that ``alarms`` of ``n`` good images above the threshold still allow, at
    ``confidence`` (one-sided Clopper-Pearson). With no alarm in 20 images it is 13.9%: 20 images cannot confirm a
    1% rate; it takes 299 (``ln(0.05) / ln(0.99)``)."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    return 1.0 if alarms >= n else float(beta.ppf(confidence, alarms + 1, n - alarms))


def images_to_confirm(far: float, confidence: float = 0.95) -> int:
    """How many defect-free images without a single alarm confirm a false-alarm rate of ``far`` at ``confidence``:
    ``ceil(ln(1 - confidence) / ln(1 - far))`` (299 for 1% at 95%; :func:`far_upper_bound` the other way round)."""
    if not 0.0 < far < 1.0:
        raise ValueError(f"false-alarm rate must be in (0, 1), got {far}")
    return int(np.ceil(np.log(1.0 - confidence) / np.log(1.0 - far)))


def describe_rule(rule: str, q: float, margin: float) -> str:
    """The formula of threshold rule ``rule`` at quantile ``q``, as the bundle manifest states it."""
    empirical = f"Q_{q:g}(good) + {margin:g} * (Q_{q:g}(good) - median(good))"
    normal = f"mean + t_{q:g},n-1 * sd * sqrt(1 + 1/n)"
    formulas = {"max-of-both": f"max({empirical}, {normal})", "quantile+margin": empirical, "normal-prediction": normal}
    if rule not in formulas:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {RULES}")
    return f"{rule}: {formulas[rule]}"


def calibrate_threshold(
    good_scores: np.ndarray, target_false_alarm_rate: float = 0.01, margin: float = 0.1, rule: str = RULES[0]
) -> Threshold:
    """Threshold on defect-free scores; raises ValueError when there are none."""
    s = np.asarray(good_scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("threshold calibration needs at least one defect-free validation image")
    if not 0.0 < target_false_alarm_rate < 1.0:
        raise ValueError(f"target_false_alarm_rate must be in (0, 1), got {target_false_alarm_rate}")
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {RULES}")
    q = 1.0 - target_false_alarm_rate
    qv, med = float(np.quantile(s, q)), float(np.median(s))
    empirical = qv + margin * max(qv - med, 0.0)
    if rule == "normal-prediction":
        value, margin = normal_prediction_bound(s, q), 0.0
    elif rule == "max-of-both":  # the empirical rule cannot reach past the largest score; the normal bound can
        value = max(empirical, normal_prediction_bound(s, q)) if s.size >= 2 else empirical
    else:
        value = empirical
    stats = {
        "n": float(s.size),
        "min": float(s.min()),
        "median": med,
        "mean": float(s.mean()),
        "std": float(s.std()),
        "max": float(s.max()),
        f"q{q:g}": qv,
        "val_false_alarm_rate": float((s >= value).mean()),
        "val_far_upper_95": far_upper_bound(int((s >= value).sum()), int(s.size)),
    }
    return Threshold(value, rule, target_false_alarm_rate, margin, int(s.size), stats)


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """F1-optimal threshold on labelled images (reported, never chosen on the test set by rdedge itself)."""
    f1, thr, p, r = f1_max(scores, labels)
    return {"threshold": thr, "f1": f1, "precision": p, "recall": r}
