"""Training's pure parts: the learning-rate schedule, planned epochs, and TrainConfig checks (the
training runs themselves: tests/integration/test_train.py)."""

from __future__ import annotations

import pytest

from pipeline.train import lr_lambda


def test_warmup_then_cosine():
    lrs = [lr_lambda(s, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_min_steps_gives_a_small_dataset_more_epochs_not_fewer_steps():
    from pipeline.train import planned_epochs

    assert planned_epochs(8, 120, 15) == 8  # 613 cells: 8 epochs already give 120 steps
    assert planned_epochs(8, 120, 2) == 60  # a 90-cell lab set: 2 steps an epoch -> 60 epochs
    assert planned_epochs(8, 0, 1) == 8


def test_train_val_needs_keep_last():
    from pipeline.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="train.fit_on: train\\+val leaves no validation cells"):
        TrainConfig(fit_on="train+val", keep="best")
    with pytest.raises(ConfigError, match="train.keep: must be one of best, last"):
        TrainConfig(keep="median")
    assert TrainConfig(fit_on="train+val", keep="last").fit_on == "train+val"
