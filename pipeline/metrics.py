"""Binary classification metrics (positive = 1, malignant) with group-bootstrap CIs.

All metrics are computed from per-cell weights so that a bootstrap resample (a
multiset of groups) is just an integer weight vector: every resample is scored
in one vectorised pass instead of re-running sklearn 1000 times.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRIC_NAMES = (
    "roc_auc",
    "pr_auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "brier",
    "ece",
)

# Cap on bootstrap-rows x cells held in memory at once.
_MAX_BLOCK_ELEMENTS = 2_000_000


def _as_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.size} vs {p.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("y must contain only 0 and 1")
    if np.isnan(p).any():
        raise ValueError("p contains NaN")
    return y, p


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0, without RuntimeWarnings."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    # floor(p * n_bins) keeps exact edges like 0.3 in bin 3; 1.0 joins the last bin.
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    return np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)


def confusion(y, p, threshold: float) -> dict[str, int]:
    y, p = _as_arrays(y, p)
    pred = p >= threshold
    pos = y == 1
    return {
        "tp": int(np.sum(pred & pos)),
        "fp": int(np.sum(pred & ~pos)),
        "tn": int(np.sum(~pred & ~pos)),
        "fn": int(np.sum(~pred & pos)),
    }


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    y, p = _as_arrays(y, p)
    if y.size == 0:
        return float("nan")
    b = _bin_index(p, n_bins)
    # sum_b (n_b/N)|mean_y - mean_p| == sum_b |sum_y - sum_p| / N
    sy = np.bincount(b, weights=y, minlength=n_bins)
    sp = np.bincount(b, weights=p, minlength=n_bins)
    return float(np.abs(sy - sp).sum() / y.size)


def reliability_curve(y, p, n_bins: int = 10) -> list[dict[str, Any]]:
    y, p = _as_arrays(y, p)
    b = _bin_index(p, n_bins)
    out = []
    for k in range(n_bins):
        m = b == k
        n = int(m.sum())
        if n == 0:
            continue
        out.append(
            {
                "bin_lower": k / n_bins,
                "bin_upper": (k + 1) / n_bins,
                "mean_predicted": float(p[m].mean()),
                "fraction_positive": float(y[m].mean()),
                "count": n,
            }
        )
    return out


def _weighted_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """Metrics for each row of integer weights w (B, N); row = one (re)sample."""
    w = np.asarray(w, dtype=float)
    pos = (y == 1).astype(float)
    neg = 1.0 - pos
    pred = (p >= threshold).astype(float)

    n_pos = w @ pos
    n_neg = w @ neg
    n_all = n_pos + n_neg
    tp = w @ (pos * pred)
    fp = w @ (neg * pred)
    fn = n_pos - tp
    tn = n_neg - fp

    sens = _div(tp, n_pos)
    spec = _div(tn, n_neg)

    # Rank metrics over distinct scores; reduceat sums weights within tied scores.
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ws = w[:, order]
    pos_u = np.add.reduceat(ws * pos[order], starts, axis=1)  # (B, U), ascending score
    neg_u = np.add.reduceat(ws * neg[order], starts, axis=1)
    neg_below = np.cumsum(neg_u, axis=1) - neg_u
    both = (n_pos > 0) & (n_neg > 0)
    # Mann-Whitney with ties counted half.
    auc = _div((pos_u * (neg_below + 0.5 * neg_u)).sum(axis=1), n_pos * n_neg)
    # AP = sum_k (R_k - R_{k-1}) * P_k at distinct thresholds, descending (as sklearn).
    pos_d = pos_u[:, ::-1]
    tps = np.cumsum(pos_d, axis=1)
    fps = np.cumsum(neg_u[:, ::-1], axis=1)
    prec = np.nan_to_num(_div(tps, tps + fps))
    ap = _div((pos_d * prec).sum(axis=1), n_pos)
    auc[~both] = np.nan
    ap[~both] = np.nan

    b = _bin_index(p, n_bins)
    resid = y - p
    ece_num = np.zeros(w.shape[0])
    for k in np.unique(b):
        m = b == k
        ece_num += np.abs(w[:, m] @ resid[m])
    ece = _div(ece_num, n_all)
    brier = _div(w @ ((p - y) ** 2), n_all)

    return {
        "roc_auc": auc,
        "pr_auc": ap,
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "brier": brier,
        "ece": ece,
    }


def binary_metrics(y, p, threshold: float) -> dict[str, float]:
    y, p = _as_arrays(y, p)
    if y.size == 0:
        return {k: float("nan") for k in METRIC_NAMES}
    m = _weighted_metrics(y, p, threshold, np.ones((1, y.size)))
    return {k: float(m[k][0]) for k in METRIC_NAMES}


def _nan_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def group_bootstrap_ci(
    y, p, groups, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile CIs from resampling whole groups with replacement.

    Resample r takes groups ``sorted_unique_groups[idx[r]]`` with
    ``idx = default_rng(seed).integers(0, G, size=(n_boot, G))``; a cell's weight
    is how many times its group was drawn, which equals scoring the concatenated
    resample with ``binary_metrics``.
    """
    y, p = _as_arrays(y, p)
    groups = np.asarray(groups).ravel()
    if groups.shape != y.shape:
        raise ValueError(f"groups and y differ in length: {groups.size} vs {y.size}")
    if y.size == 0:
        raise ValueError("no cases to bootstrap")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    _, gidx = np.unique(groups, return_inverse=True)
    gidx = gidx.ravel()
    n_groups = int(gidx.max()) + 1

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = (draws + np.arange(n_boot)[:, None] * n_groups).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups)

    block = max(1, _MAX_BLOCK_ELEMENTS // y.size)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_NAMES}
    for start in range(0, n_boot, block):
        w = counts[start : start + block][:, gidx]
        m = _weighted_metrics(y, p, threshold, w)
        for k in METRIC_NAMES:
            parts[k].append(m[k])
    return {k: _nan_interval(np.concatenate(parts[k]), alpha) for k in METRIC_NAMES}


def metrics_with_ci(y, p, groups, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    point = binary_metrics(y, p, threshold)
    ci = group_bootstrap_ci(y, p, groups, threshold, n_boot=n_boot, seed=seed)
    return {k: {"value": point[k], "ci_low": ci[k][0], "ci_high": ci[k][1]} for k in METRIC_NAMES}


def calls_by_class(
    original_class, p, threshold: float, lower: float | None = None, upper: float | None = None
) -> list[dict[str, Any]]:
    cls = np.asarray(original_class).astype(str).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if cls.shape != p.shape:
        raise ValueError(f"original_class and p differ in length: {cls.size} vs {p.size}")
    if (lower is None) != (upper is None):
        raise ValueError("give both lower and upper for a band, or neither")
    if lower is None:
        malignant = p >= threshold
        indeterminate = np.zeros(p.shape, dtype=bool)
    else:
        if lower > upper:
            raise ValueError(f"band lower {lower} > upper {upper}")
        malignant = p >= upper
        indeterminate = ~malignant & ~(p < lower)
    out = []
    for name in sorted(set(cls.tolist())):
        m = cls == name
        n = int(m.sum())
        k = int(malignant[m].sum())
        out.append(
            {
                "original_class": name,
                "n": n,
                "called_malignant": k,
                "fraction_malignant": k / n if n else math.nan,
                "indeterminate": int(indeterminate[m].sum()),
            }
        )
    return out
