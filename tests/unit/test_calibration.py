"""Temperature scaling, threshold rules and the indeterminate band on synthetic data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pipeline.calibration import CALLS, Band, choose_threshold, fit_temperature, nll, softmax


def test_softmax_is_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, 998.0], [-1000.0, 0.0, 1.0]])
    s = softmax(z)
    assert np.isfinite(s).all()
    assert s.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert s[0, 0] == pytest.approx(1 / (2 + math.exp(-2)))
    # temperature 2 on [0, 2 ln 3] gives odds 1:3
    assert softmax(np.array([[0.0, 2 * math.log(3)]]), 2.0)[0] == pytest.approx([0.25, 0.75])


def test_nll_hand_values():
    assert nll(np.array([[0.0, 0.0]]), [0]) == pytest.approx(math.log(2))
    # p(y=1) = 0.75 and p(y=0) = 0.75 -> -ln .75
    z = np.array([[0.0, math.log(3)], [math.log(3), 0.0]])
    assert nll(z, [1, 0]) == pytest.approx(-math.log(0.75))
    with pytest.raises(ValueError):
        nll(np.zeros(3), [0, 1, 0])


def _labelled(true_logits, seed):
    rng = np.random.default_rng(seed)
    prob = softmax(true_logits)
    return (rng.random(len(prob))[:, None] > np.cumsum(prob, axis=1)).sum(axis=1)


def test_temperature_recovers_overconfidence_and_lowers_nll():
    rng = np.random.default_rng(0)
    true = rng.normal(0, 1.0, (4000, 3))
    y = _labelled(true, seed=1)
    over = true * 4  # overconfident by a factor 4
    t = fit_temperature(over, y)
    assert isinstance(t, float)
    assert 3.4 < t < 4.6, t
    assert nll(over, y, t) < nll(over, y) - 0.1
    # an already calibrated model keeps T near 1
    assert 0.85 < fit_temperature(true, y) < 1.15


def test_temperature_stays_in_bounds():
    # Separable with tiny margins: sharper is always better, so T hits the lower bound.
    z = np.array([[0.01, 0.0], [0.0, 0.01]] * 10)
    y = np.array([0, 1] * 10)
    t = fit_temperature(z, y)
    assert 0.05 <= t < 0.06
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((4, 1)), [0, 0, 0, 0])


def _sens(y, p, t):
    return float(np.mean(p[y == 1] >= t))


def test_sensitivity_rule_meets_target_and_is_highest():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1)
    res = choose_threshold(y, p, rule="sensitivity", target=0.95)
    t = res["threshold"]
    assert res["rule"] == "sensitivity" and res["target"] == 0.95
    assert t in set(p.tolist())
    assert res["sensitivity"] == pytest.approx(_sens(y, p, t)) and res["sensitivity"] >= 0.95
    assert res["specificity"] == pytest.approx(float(np.mean(p[y == 0] < t)))
    above = np.unique(p)[np.unique(p) > t]
    assert _sens(y, p, above.min()) < 0.95  # next unique value up breaks the target


def test_sensitivity_rule_exact_boundary():
    # 20 positives: target .95 needs 19 -> threshold is the 19th highest positive score
    y = np.array([1] * 20 + [0] * 5)
    p = np.r_[np.linspace(0.2, 0.99, 20), np.full(5, 0.1)]
    res = choose_threshold(y, p, target=0.95)
    assert res["threshold"] == pytest.approx(np.sort(p[:20])[1])
    assert res["sensitivity"] == pytest.approx(0.95)
    assert res["specificity"] == 1.0


def test_youden_picks_obvious_cut():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    res = choose_threshold(y, p, rule="youden")
    assert res == {"rule": "youden", "target": None, "threshold": 0.7, "sensitivity": 1.0, "specificity": 1.0}


def test_youden_ties_go_to_highest_threshold():
    # t=.6: sens 1/2, spec 1 -> J=.5; t=.5: J=0; t=.4: sens 1, spec 1/2 -> J=.5; take .6
    y = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.4, 0.5, 0.6])
    assert choose_threshold(y, p, rule="youden")["threshold"] == 0.6


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="no positive"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold([0, 1], [0.1, 0.9], rule="f1")


def test_band_calls_and_coverage():
    band = Band(threshold=0.5, width=0.25)
    assert (band.lower, band.upper) == (0.375, 0.625)
    p = np.array([0.0, 0.374, 0.375, 0.5, 0.624, 0.625, 1.0])
    assert band.call(p).tolist() == [
        "benign",
        "benign",
        "indeterminate",
        "indeterminate",
        "indeterminate",
        "malignant",
        "malignant",
    ]
    assert band.coverage(p) == pytest.approx(4 / 7)
    assert set(band.call(p)) <= set(CALLS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        band.width = 0.1  # type: ignore[misc]


def test_band_clips_to_unit_interval():
    band = Band(threshold=0.875, width=0.5)
    assert (band.lower, band.upper) == (0.625, 1.0)
    assert band.call([1.0, 0.99, 0.6]).tolist() == ["malignant", "indeterminate", "benign"]


def test_band_width_zero_is_plain_threshold():
    band = Band(threshold=0.3, width=0.0)
    p = np.array([0.0, 0.29, 0.3, 0.31, 1.0])
    assert band.call(p).tolist() == ["benign", "benign", "malignant", "malignant", "malignant"]
    assert band.coverage(p) == 1.0
    with pytest.raises(ValueError):
        Band(threshold=0.5, width=-0.1)
