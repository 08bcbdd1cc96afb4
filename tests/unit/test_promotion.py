"""The promotion rule (pipeline/promotion.py) on constructed evidence, and its simulated error rates."""

from __future__ import annotations

import math

import pytest

from pipeline.config import PromotionConfig
from pipeline.promotion import Evidence, decide, rejection_rates

RULE = PromotionConfig(min_oof_auc_ci_low=0.95, min_auc=0.93, min_sensitivity=0.90)


def _evidence(low=0.97, auc=0.96, sens=0.95, held=0.98):
    return Evidence(
        heldout_auc=held, heldout_auc_ci_low=low, heldout_source="out-of-fold", test_auc=auc, test_sensitivity=sens
    )


def test_promotes_when_all_three_hold_and_says_why():
    promote, reason = decide(_evidence(), RULE)
    assert promote
    assert reason == (
        "promoted: out-of-fold AUC 0.9800 (lower 95% bound 0.9700 >= 0.95), test AUC 0.9600 >= 0.93, "
        "test sensitivity 0.9500 >= 0.9"
    )


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"low": 0.949}, "out-of-fold AUC lower 95% bound 0.9490 < 0.95"),
        ({"auc": 0.92}, "test AUC 0.9200 < 0.93"),
        ({"sens": 0.89}, "test sensitivity 0.8900 < 0.9"),
        ({"low": None}, "no held-out (out-of-fold) evidence"),
        ({"auc": math.nan}, "test AUC nan < 0.93"),
    ],
)
def test_refuses_and_names_each_failed_condition(kwargs, text):
    promote, reason = decide(_evidence(**kwargs), RULE)
    assert not promote and reason.startswith("not promoted: ") and text in reason
    assert reason.count(";") == 0  # one failure, one clause


def test_every_failure_is_listed():
    promote, reason = decide(_evidence(low=0.5, auc=0.5, sens=0.5), RULE)
    assert not promote and reason.count(";") == 2


def test_boundaries_pass():
    assert decide(_evidence(low=0.95, auc=0.93, sens=0.90), RULE)[0]


def test_simulated_rejection_falls_with_the_true_auc_and_the_old_rule_was_a_coin_flip():
    sizes = {"n_oof": (201, 412), "n_test": (36, 73), "n_sim": 600, "seed": 1}
    rates = [rejection_rates(a, RULE, **sizes)["reject"] for a in (0.93, 0.97, 0.99)]
    assert rates[0] > 0.95 and rates[0] > rates[1] > rates[2] and rates[2] < 0.1
    # test AUC >= 0.97 and sensitivity >= 0.95 on 109 cells refuses a true-0.98 model about half the time
    old = PromotionConfig(min_oof_auc_ci_low=0.0, min_auc=0.97, min_sensitivity=0.95)
    assert 0.35 < rejection_rates(0.98, old, **sizes)["reject"] < 0.75
    # clustering (a design effect > 1) widens the OOF interval, so the bound refuses more often
    plain = rejection_rates(0.97, RULE, **sizes)["reject_oof_bound"]
    assert rejection_rates(0.97, RULE, design_effect=3.0, **sizes)["reject_oof_bound"] > plain
