"""Temperature scaling, operating-threshold rules and an indeterminate band."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

CALLS = ("benign", "malignant", "indeterminate")
T_MIN, T_MAX = 0.05, 20.0
RULES = ("sensitivity", "youden")


def _check_logits(logits, y=None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=float)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {z.shape}")
    if y is None:
        return z, None
    y = np.asarray(y).astype(int).ravel()
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"logits and y differ in length: {z.shape[0]} vs {y.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1] - 1}]")
    return z, y


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=float) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def malignant_probability(logits: np.ndarray, labels, positive_labels, temperature: float = 1.0) -> np.ndarray:
    """P(malignant) = summed softmax(logits / T) over the positive labels."""
    idx = [list(labels).index(x) for x in positive_labels]
    return softmax(logits, temperature)[:, idx].sum(1)


def nll(logits, y, temperature: float = 1.0) -> float:
    z, y = _check_logits(logits, y)
    if y.size == 0:
        raise ValueError("no samples")
    z = z / temperature
    log_p = z[np.arange(y.size), y] - logsumexp(z, axis=1)
    return float(-log_p.mean())


def fit_temperature(logits, y) -> float:
    """T in [0.05, 20] minimising mean NLL of softmax(logits / T)."""
    z, y = _check_logits(logits, y)
    if y.size == 0:
        raise ValueError("no samples to fit a temperature on")
    # Search log T: the loss is far better conditioned there than in T.
    res = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(min(max(math.exp(res.x), T_MIN), T_MAX))


def _sens_spec(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    pred = p >= t
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    sens = float((pred & (y == 1)).sum() / n_pos) if n_pos else math.nan
    spec = float((~pred & (y == 0)).sum() / n_neg) if n_neg else math.nan
    return sens, spec


def choose_threshold(y, p, rule: str = "sensitivity", target: float = 0.95) -> dict:
    """Pick an operating threshold among the unique values of p (p >= t is positive).

    "sensitivity": the highest t whose sensitivity is >= target.
    "youden": the t maximising sensitivity + specificity - 1, ties to the highest t.
    """
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.size} vs {p.size}")
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {RULES}")
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0:
        raise ValueError("cannot choose a threshold: y has no positive (malignant) cases")

    cand = np.unique(p)[::-1]  # descending
    # Counts called positive at each candidate: p >= t.
    tp = n_pos - np.searchsorted(np.sort(p[y == 1]), cand, side="left")
    fp = n_neg - np.searchsorted(np.sort(p[y == 0]), cand, side="left")

    if rule == "sensitivity":
        if not 0 < target <= 1:
            raise ValueError(f"sensitivity target must be in (0, 1], got {target}")
        # Integer comparison avoids float round-off at the target boundary.
        ok = np.flatnonzero(tp >= math.ceil(target * n_pos - 1e-9))
        t = float(cand[ok[0]])  # sensitivity only rises as t falls, so ok is non-empty
        out_target: float | None = float(target)
    else:
        if n_neg == 0:
            raise ValueError("cannot use the youden rule: y has no negative (benign) cases")
        # J * n_pos * n_neg in integers, so exact ties stay ties.
        j = tp * n_neg + (n_neg - fp) * n_pos
        t = float(cand[int(np.argmax(j))])  # first max == highest t
        out_target = None

    sens, spec = _sens_spec(y, p, t)
    return {"rule": rule, "target": out_target, "threshold": t, "sensitivity": sens, "specificity": spec}


@dataclass(frozen=True)
class Band:
    """Indeterminate zone of total `width` centred on `threshold`, clipped to [0, 1]."""

    threshold: float
    width: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.width < 0:
            raise ValueError(f"width must be >= 0, got {self.width}")

    @property
    def lower(self) -> float:
        return max(0.0, self.threshold - self.width / 2)

    @property
    def upper(self) -> float:
        return min(1.0, self.threshold + self.width / 2)

    def call(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        out = np.full(p.shape, "indeterminate", dtype=object)
        out[p < self.lower] = "benign"
        out[p >= self.upper] = "malignant"
        return out.astype(str)

    def coverage(self, p) -> float:
        calls = self.call(p)
        if calls.size == 0:
            return math.nan
        return float(np.mean(calls != "indeterminate"))
