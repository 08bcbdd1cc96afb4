"""The rule that gives a registered model `@champion`, and its error rates.

A model is promoted when all three hold (thresholds in params.yaml `promotion`):
1. the lower 95% group-bootstrap bound of its pooled held-out AUC (out-of-fold over train+val,
   ~613 cells) is >= `min_oof_auc_ci_low`: the main evidence, large enough to separate models;
2. its test AUC is >= `min_auc`; and
3. its test sensitivity, at the threshold fitted out of fold, is >= `min_sensitivity`.
The test split (109 cells) is a sanity floor, not a contest: with ~73 malignant test cells a model
whose true sensitivity is 0.95 shows a test sensitivity under 0.95 about half the time, so a test
minimum at the target would be a coin flip. `rejection_rates` simulates how often the rule refuses
a model of a given true AUC (benchmarks/promotion_rule.py prints the table the README quotes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import PromotionConfig


@dataclass(frozen=True)
class Evidence:
    """What the rule reads: held-out AUC with its lower CI bound, and two test numbers."""

    heldout_auc: float | None
    heldout_auc_ci_low: float | None
    heldout_source: str  # "out-of-fold" or "validation"
    test_auc: float
    test_sensitivity: float


def decide(evidence: Evidence, cfg: PromotionConfig) -> tuple[bool, str]:
    """(promote?, reason). Every failed condition is named; NaN or missing evidence fails."""
    failures = []
    low = evidence.heldout_auc_ci_low
    if low is None:
        failures.append("no held-out (out-of-fold) evidence")
    elif not low >= cfg.min_oof_auc_ci_low:
        failures.append(f"{evidence.heldout_source} AUC lower 95% bound {low:.4f} < {cfg.min_oof_auc_ci_low}")
    if not evidence.test_auc >= cfg.min_auc:
        failures.append(f"test AUC {evidence.test_auc:.4f} < {cfg.min_auc}")
    if not evidence.test_sensitivity >= cfg.min_sensitivity:
        failures.append(f"test sensitivity {evidence.test_sensitivity:.4f} < {cfg.min_sensitivity}")
    if failures:
        return False, "not promoted: " + "; ".join(failures)
    return True, (
        f"promoted: {evidence.heldout_source} AUC {evidence.heldout_auc:.4f} (lower 95% bound "
        f"{low:.4f} >= {cfg.min_oof_auc_ci_low}), test AUC {evidence.test_auc:.4f} >= {cfg.min_auc}, "
        f"test sensitivity {evidence.test_sensitivity:.4f} >= {cfg.min_sensitivity}"
    )


# ---------------------------------------------------------------- error rates by simulation


def _auc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Row-wise Mann-Whitney AUC of (R, n_neg) vs (R, n_pos) scores (continuous: no ties)."""
    both = np.concatenate([neg, pos], axis=1)
    ranks = both.argsort(axis=1).argsort(axis=1) + 1.0
    n_neg, n_pos = neg.shape[1], pos.shape[1]
    return (ranks[:, n_neg:].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos)


def _hanley_mcneil_se(auc: np.ndarray, n_neg: float, n_pos: float) -> np.ndarray:
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_neg * n_pos)
    return np.sqrt(np.maximum(var, 0))


def rejection_rates(
    true_auc: float,
    cfg: PromotionConfig,
    n_oof: tuple[int, int],
    n_test: tuple[int, int],
    target_sensitivity: float = 0.95,
    design_effect: float = 1.0,
    n_sim: int = 2000,
    seed: int = 0,
) -> dict:
    """How often the rule refuses a model whose true AUC is `true_auc` (binormal, equal variances).

    n_oof / n_test: (benign, malignant) counts, each at least 1. Each simulated run draws OOF scores, fits the
    threshold on them by the sensitivity rule, takes the OOF AUC's lower bound as AUC - 1.96 SE
    (Hanley-McNeil, SE scaled by sqrt(design_effect) for cells clustered in fields of view), then
    draws a test split and applies the rule. Returns the rate of each failure and of any failure.
    """
    from scipy.stats import norm

    if min(*n_oof, *n_test) < 1:
        raise ValueError(f"need benign and malignant cells in both sets, got OOF {n_oof} and test {n_test}")
    rng = np.random.default_rng(seed)
    d = math.sqrt(2) * norm.ppf(true_auc)  # binormal separation giving this AUC
    (on, op), (tn, tp) = n_oof, n_test
    oof_neg, oof_pos = rng.normal(0, 1, (n_sim, on)), rng.normal(d, 1, (n_sim, op))
    oof_auc = _auc(oof_neg, oof_pos)
    low = oof_auc - 1.96 * _hanley_mcneil_se(oof_auc, on, op) * math.sqrt(design_effect)
    # the sensitivity rule: the highest threshold that calls >= target of the OOF malignant cells
    k = math.ceil(target_sensitivity * op - 1e-9)
    threshold = np.sort(oof_pos, axis=1)[:, op - k]
    test_neg, test_pos = rng.normal(0, 1, (n_sim, tn)), rng.normal(d, 1, (n_sim, tp))
    test_auc = _auc(test_neg, test_pos)
    test_sens = (test_pos >= threshold[:, None]).mean(axis=1)
    fail_oof = low < cfg.min_oof_auc_ci_low
    fail_auc = test_auc < cfg.min_auc
    fail_sens = test_sens < cfg.min_sensitivity
    return {
        "true_auc": true_auc,
        "reject": float((fail_oof | fail_auc | fail_sens).mean()),
        "reject_oof_bound": float(fail_oof.mean()),
        "reject_test_auc": float(fail_auc.mean()),
        "reject_test_sensitivity": float(fail_sens.mean()),
        "n_sim": n_sim,
        "design_effect": design_effect,
    }
