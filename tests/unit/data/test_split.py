"""Grouped, stratified, seeded split: no group crosses, every part has every label, folds too."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SplitConfig
from pipeline.data.split import SplitError, check_split, run, split_frame, summary_table


def synthetic_manifest(n_groups=120, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    classes = {"normal_a": "benign", "normal_b": "benign", "dys": "malignant", "cis": "malignant"}
    for g in range(n_groups):
        cls = list(classes)[g % 4]
        for c in range(int(rng.integers(1, 8))):
            rows.append(
                {
                    "path": f"{cls}/{g:04d}-{c}.jpg",
                    "sha256": f"{g}-{c}",
                    "width": 200,
                    "height": 200,
                    "mode": "RGB",
                    "original_class": cls,
                    "label": classes[cls],
                    "group": f"{g:04d}",
                }
            )
    return pd.DataFrame(rows)


def test_groups_never_cross_and_fractions_hold():
    frame = split_frame(synthetic_manifest(), SplitConfig(seed=1, folds=5))
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    shares = frame["split"].value_counts(normalize=True)
    for part, target in {"train": 0.7, "val": 0.15, "test": 0.15}.items():
        assert abs(shares[part] - target) < 0.03, shares
    # Label balance matches the whole set in every part.
    overall = (frame["label"] == "malignant").mean()
    for part, sub in frame.groupby("split"):
        assert abs((sub["label"] == "malignant").mean() - overall) < 0.05, part
    assert set(frame.loc[frame["split"] == "test", "fold"]) == {-1}
    assert set(frame.loc[frame["split"] != "test", "fold"]) == set(range(5))


def test_deterministic_per_seed():
    m = synthetic_manifest()
    a = split_frame(m, SplitConfig(seed=3))
    b = split_frame(m, SplitConfig(seed=3))
    c = split_frame(m, SplitConfig(seed=4))
    assert a.equals(b)
    assert not a["split"].equals(c["split"])


def test_groups_keep_string_ids_with_leading_zeros(tmp_path):
    out = tmp_path / "split"
    manifest = tmp_path / "manifest.csv"
    synthetic_manifest().to_csv(manifest, index=False)
    run(manifest, SplitConfig(seed=0, folds=3), out)
    written = pd.read_csv(out / "split.csv", dtype={"group": str})
    assert written["group"].str.len().eq(4).all()
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary[p]["n_images"] for p in ("train", "val", "test")) == len(written)
    assert set(summary["folds"]) == {"0", "1", "2"}


def test_too_few_groups_is_a_clear_error():
    m = synthetic_manifest(n_groups=4)
    with pytest.raises(SplitError, match="has no image labelled"):
        split_frame(m, SplitConfig(folds=0))


def test_check_split_catches_a_crossing_group():
    frame = split_frame(synthetic_manifest(), SplitConfig(folds=0))
    g = frame["group"].iloc[0]
    other = "test" if frame["split"].iloc[0] != "test" else "train"
    rows = frame.index[frame["group"] == g]
    frame.loc[rows[0], "split"] = other
    if len(rows) == 1:
        extra = frame.loc[rows[0]].copy()
        extra["split"] = "val" if other != "val" else "train"
        frame = pd.concat([frame, extra.to_frame().T], ignore_index=True)
    with pytest.raises(SplitError, match="more than one side"):
        check_split(frame)


def test_summary_table_counts_split_by_label_and_class():
    frame = split_frame(synthetic_manifest(), SplitConfig(folds=0))
    text = summary_table(frame)
    for word in ("train", "val", "test", "total", "benign", "malignant", "normal_a", "cis"):
        assert word in text
    assert str(len(frame)) in text.splitlines()[-1]
