"""Binary metrics against hand-computed values; group-bootstrap CIs on synthetic data."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.metrics import (
    METRIC_NAMES,
    binary_metrics,
    calls_by_class,
    confusion,
    expected_calibration_error,
    group_bootstrap_ci,
    metrics_with_ci,
    reliability_curve,
)

# Hand example, threshold 0.5 (p >= 0.5 is called malignant):
#   positives p = .95 .85 .65 .42   -> TP TP TP FN          tp=3 fn=1
#   negatives p = .75 .45 .25 .15 .05 .05 -> FP TN TN TN TN TN   fp=1 tn=5
Y10 = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P10 = np.array([0.95, 0.85, 0.65, 0.42, 0.75, 0.45, 0.25, 0.15, 0.05, 0.05])


def test_confusion_hand_example_and_threshold_is_inclusive():
    assert confusion(Y10, P10, 0.5) == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    # p == threshold counts as positive
    assert confusion(Y10, P10, 0.65) == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    assert confusion(Y10, P10, 0.66) == {"tp": 2, "fp": 1, "tn": 5, "fn": 2}


def test_binary_metrics_hand_example():
    m = binary_metrics(Y10, P10, 0.5)
    assert tuple(m) == METRIC_NAMES
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["ppv"] == pytest.approx(3 / 4)  # 3 / (3 + 1)
    assert m["npv"] == pytest.approx(5 / 6)  # 5 / (5 + 1)
    assert m["f1"] == pytest.approx(0.75)  # 2*3 / (2*3 + 1 + 1)
    # Brier: pos (1-p)^2 = .0025+.0225+.1225+.3364 = .4839;
    #        neg p^2 = .5625+.2025+.0625+.0225+.0025+.0025 = .855; (.4839+.855)/10
    assert m["brier"] == pytest.approx(0.13389)
    # ECE, 10 bins, sum_b |sum y - sum p| / N:
    #   b9 .05, b8 .15, b7 .75, b6 .35, b4 {.42 y1, .45 y0} |1-.87|=.13,
    #   b2 .25, b1 .15, b0 {.05,.05} .1  -> 1.93 / 10
    assert m["ece"] == pytest.approx(0.193)
    # AUC: 0.95 and 0.85 beat all 6 negatives, 0.65 beats 5, 0.42 beats 4 -> 21/24
    assert m["roc_auc"] == pytest.approx(21 / 24)
    # AP: precision at each positive in descending order 1, 1, 3/4, 4/6 -> mean 41/48
    assert m["pr_auc"] == pytest.approx(41 / 48)
    assert all(type(v) is float for v in m.values())


def test_ece_and_reliability_curve_hand_example():
    assert expected_calibration_error(Y10, P10) == pytest.approx(0.193)
    curve = reliability_curve(Y10, P10)
    # bins 3 and 5 are empty and left out
    assert [c["bin_lower"] for c in curve] == pytest.approx([0, 0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9])
    assert [c["count"] for c in curve] == [2, 1, 1, 2, 1, 1, 1, 1]
    b4 = curve[3]
    assert (b4["bin_lower"], b4["bin_upper"]) == pytest.approx((0.4, 0.5))
    assert b4["mean_predicted"] == pytest.approx(0.435)
    assert b4["fraction_positive"] == pytest.approx(0.5)
    json.dumps(curve)


def test_ece_edges_last_bin_includes_one():
    # p = 1.0 joins the last bin with 0.95: |2 - 1.95| / 2
    assert expected_calibration_error([1, 1], [0.95, 1.0]) == pytest.approx(0.025)
    assert reliability_curve([1, 1], [0.95, 1.0])[0]["count"] == 2
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_perfect_separation_gives_auc_one():
    m = binary_metrics([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9], 0.5)
    assert m["roc_auc"] == 1.0
    assert m["pr_auc"] == 1.0
    assert m["sensitivity"] == m["specificity"] == m["f1"] == 1.0


def test_auc_and_ap_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), 1)  # many ties
        m = binary_metrics(y, p, 0.5)
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_zero_denominators_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_pos = binary_metrics([1, 1, 1], [0.2, 0.3, 0.9], 0.5)
        none_called = binary_metrics([0, 1, 0], [0.1, 0.2, 0.3], 0.5)
    assert math.isnan(only_pos["roc_auc"]) and math.isnan(only_pos["pr_auc"])
    assert math.isnan(only_pos["specificity"]) and math.isnan(only_pos["balanced_accuracy"])
    assert only_pos["npv"] == 0.0  # tn / (tn + fn) = 0 / 2, defined
    assert only_pos["sensitivity"] == pytest.approx(1 / 3)
    assert math.isnan(none_called["ppv"])  # nothing called positive
    assert none_called["npv"] == pytest.approx(2 / 3)
    assert none_called["f1"] == 0.0  # 0 / (0 + 0 + 1)


def _synthetic(n_groups, seed, cells=(1, 3), noise=1.0):
    """Groups share a label; p depends on label plus a group effect plus cell noise."""
    rng = np.random.default_rng(seed)
    y, p, g = [], [], []
    for k in range(n_groups):
        label = k % 2
        effect = rng.normal(0, 0.7)
        for _ in range(int(rng.integers(cells[0], cells[1] + 1))):
            logit = 1.5 * (2 * label - 1) + effect + rng.normal(0, noise)
            y.append(label)
            p.append(1 / (1 + math.exp(-logit)))
            g.append(f"pt{seed}_{k}")
    return np.array(y), np.array(p), np.array(g)


def test_bootstrap_ci_contains_point_estimate():
    y, p, g = _synthetic(60, seed=1)
    res = metrics_with_ci(y, p, g, threshold=0.5, n_boot=500, seed=0)
    assert tuple(res) == METRIC_NAMES
    for name in ("roc_auc", "sensitivity", "balanced_accuracy"):
        r = res[name]
        assert r["ci_low"] < r["value"] < r["ci_high"], (name, r)
        assert 0.5 < r["value"] < 1.0
    json.dumps(res)
    for r in res.values():
        assert all(type(v) is float for v in r.values())


def test_bootstrap_matches_explicit_resampling_with_binary_metrics():
    # Documented draw: idx = default_rng(seed).integers(0, G, (n_boot, G)) over sorted groups.
    y, p, g = _synthetic(15, seed=2)
    n_boot, seed = 40, 7
    ci = group_bootstrap_ci(y, p, g, 0.5, n_boot=n_boot, seed=seed)
    names = np.unique(g)
    members = [np.flatnonzero(g == name) for name in names]
    idx = np.random.default_rng(seed).integers(0, len(names), (n_boot, len(names)))
    rows = []
    for draw in idx:
        cells = np.concatenate([members[k] for k in draw])
        rows.append(binary_metrics(y[cells], p[cells], 0.5))
    for name in METRIC_NAMES:
        vals = np.array([r[name] for r in rows])
        vals = vals[~np.isnan(vals)]
        expected = np.percentile(vals, [2.5, 97.5])
        assert ci[name] == pytest.approx(tuple(expected), abs=1e-12), name


def test_bootstrap_ci_shrinks_with_more_groups():
    def width(n_groups):
        y, p, g = _synthetic(n_groups, seed=n_groups)
        lo, hi = group_bootstrap_ci(y, p, g, 0.5, n_boot=500, seed=0)["roc_auc"]
        return hi - lo

    small, large = width(40), width(160)
    assert large < 0.75 * small, (small, large)


def test_bootstrap_resamples_groups_not_cells():
    # Few groups; every cell of a group shares the label and nearly the same score.
    rng = np.random.default_rng(5)
    bases = {1: [0.35, 0.55, 0.7, 0.85], 0: [0.15, 0.4, 0.6, 0.3]}  # overlapping: AUC < 1
    y, p, g = [], [], []
    for k in range(8):
        label = k % 2
        base = bases[label][k // 2]
        for c in range(12):
            y.append(label)
            p.append(float(np.clip(base + rng.normal(0, 0.02), 0, 1)))
            g.append(f"g{k}")
    y, p, g = np.array(y), np.array(p), np.array(g)
    by_group = group_bootstrap_ci(y, p, g, 0.5, n_boot=500, seed=0)
    by_cell = group_bootstrap_ci(y, p, np.arange(y.size).astype(str), 0.5, n_boot=500, seed=0)
    for name in ("roc_auc", "sensitivity", "balanced_accuracy"):
        w_group = by_group[name][1] - by_group[name][0]
        w_cell = by_cell[name][1] - by_cell[name][0]
        assert w_group > 1.5 * w_cell, (name, w_group, w_cell)


def test_bootstrap_all_nan_metric_gives_nan_interval_and_is_seeded():
    y = np.ones(6, dtype=int)
    p = np.array([0.2, 0.4, 0.6, 0.7, 0.8, 0.9])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ci = group_bootstrap_ci(y, p, g, 0.5, n_boot=50, seed=1)
    assert all(math.isnan(v) for v in ci["roc_auc"])
    assert all(math.isnan(v) for v in ci["specificity"])
    assert not math.isnan(ci["sensitivity"][0])
    np.testing.assert_equal(group_bootstrap_ci(y, p, g, 0.5, n_boot=50, seed=1), ci)


def test_bootstrap_1000_resamples_is_fast():
    rng = np.random.default_rng(0)
    g = np.array([f"g{k}" for k in np.r_[np.arange(60), rng.integers(0, 60, 50)]])
    y = np.array([int(name[1:]) % 2 for name in g])
    p = np.clip(0.3 * y + 0.7 * rng.random(y.size), 0, 1)
    start = time.perf_counter()
    group_bootstrap_ci(y, p, g, 0.5, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_calls_by_class_with_and_without_band():
    cls = ["normal", "normal", "normal", "carcinoma", "carcinoma", "dysplasia"]
    p = [0.1, 0.45, 0.7, 0.9, 0.5, 0.55]
    plain = calls_by_class(cls, p, threshold=0.5)
    assert [r["original_class"] for r in plain] == ["carcinoma", "dysplasia", "normal"]
    assert plain[0] == {
        "original_class": "carcinoma",
        "n": 2,
        "called_malignant": 2,
        "fraction_malignant": 1.0,
        "indeterminate": 0,
    }
    assert plain[2]["called_malignant"] == 1 and plain[2]["indeterminate"] == 0
    band = calls_by_class(cls, p, threshold=0.5, lower=0.4, upper=0.6)
    # carcinoma: .9 malignant, .5 indeterminate; dysplasia .55 indeterminate;
    # normal: .1 benign, .45 indeterminate, .7 malignant
    assert [(r["called_malignant"], r["indeterminate"]) for r in band] == [(1, 1), (0, 1), (1, 1)]
    assert band[0]["fraction_malignant"] == 0.5
    json.dumps(band)
    with pytest.raises(ValueError):
        calls_by_class(cls, p, 0.5, lower=0.4)
