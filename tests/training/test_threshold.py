"""The OK/NG threshold rules: what each promises about false alarms on new defect-free images."""

from __future__ import annotations

import numpy as np
import pytest

from training.threshold import RULES, calibrate_threshold


def test_quantile_margin_rule_is_the_documented_formula() -> None:
    s = np.arange(1.0, 21.0)  # 1..20
    thr = calibrate_threshold(s, 0.01, margin=0.1, rule="quantile+margin")
    q = np.quantile(s, 0.99)
    assert thr.value == pytest.approx(q + 0.1 * (q - np.median(s)))
    assert thr.rule == "quantile+margin" and thr.n_images == 20


def test_normal_prediction_rule_keeps_its_false_alarm_promise_on_new_normal_samples() -> None:
    """Over many draws of 20 validation scores, the share of new good images above the threshold is the target."""
    rng = np.random.default_rng(0)
    far = {rule: [] for rule in RULES}
    for _ in range(400):
        val, new = rng.normal(2.0, 0.3, 20), rng.normal(2.0, 0.3, 5000)
        for rule in RULES:
            far[rule].append(float((new >= calibrate_threshold(val, 0.01, rule=rule).value).mean()))
    assert np.mean(far["normal-prediction"]) == pytest.approx(0.01, abs=0.002)
    # The empirical quantile of 20 images cannot promise 1%: it is near their maximum (about 1 in 21 above it).
    assert np.mean(far["quantile+margin"]) > 0.02
    # The default takes the larger threshold: never more false alarms than either rule alone.
    assert np.mean(far["max-of-both"]) <= min(np.mean(far["quantile+margin"]), np.mean(far["normal-prediction"]))


def test_default_rule_is_the_larger_of_the_two() -> None:
    from training.threshold import normal_prediction_bound

    rng = np.random.default_rng(1)
    for s in (rng.normal(1.0, 0.2, 20), np.r_[rng.normal(1.0, 0.1, 300), [3.0, 3.5, 4.0, 5.0]]):
        thr = calibrate_threshold(s)
        emp = calibrate_threshold(s, rule="quantile+margin").value
        assert thr.rule == "max-of-both"
        assert thr.value == pytest.approx(max(emp, normal_prediction_bound(s, 0.99)))
    assert calibrate_threshold(np.array([2.0])).value == 2.0  # one image: the empirical rule alone


def test_threshold_rule_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown threshold rule"):
        calibrate_threshold(np.ones(5), rule="max")
    with pytest.raises(ValueError, match="at least two"):
        calibrate_threshold(np.ones(1), rule="normal-prediction")
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold(np.array([]))


def test_far_upper_bound_says_what_n_good_images_can_confirm() -> None:
    from training.threshold import far_upper_bound

    assert far_upper_bound(0, 20) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-6)  # 13.9%
    assert far_upper_bound(0, 298) > 0.01 > far_upper_bound(0, 299)
    assert far_upper_bound(2, 20) > far_upper_bound(0, 20)
    assert far_upper_bound(20, 20) == 1.0 and far_upper_bound(0, 0) == 1.0
    thr = calibrate_threshold(np.linspace(0, 1, 20))
    assert thr.stats["val_far_upper_95"] == pytest.approx(far_upper_bound(0, 20))


def test_images_to_confirm_is_the_inverse_of_the_upper_bound() -> None:
    from training.threshold import far_upper_bound, images_to_confirm

    assert images_to_confirm(0.01) == 299 and images_to_confirm(0.05) == 59
    n = images_to_confirm(0.02)
    assert far_upper_bound(0, n) <= 0.02 < far_upper_bound(0, n - 1)
    with pytest.raises(ValueError, match="false-alarm rate"):
        images_to_confirm(0.0)


def test_describe_rule_states_the_rule_that_set_the_value() -> None:
    from training.threshold import describe_rule

    assert describe_rule("quantile+margin", 0.99, 0.1) == (
        "quantile+margin: Q_0.99(good) + 0.1 * (Q_0.99(good) - median(good))"
    )
    assert describe_rule("normal-prediction", 0.99, 0.1) == "normal-prediction: mean + t_0.99,n-1 * sd * sqrt(1 + 1/n)"
    both = describe_rule("max-of-both", 0.99, 0.1)
    assert both.startswith("max-of-both: max(Q_0.99") and "sqrt(1 + 1/n))" in both
    with pytest.raises(ValueError, match="unknown threshold rule"):
        describe_rule("median", 0.99, 0.1)
