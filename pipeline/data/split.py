"""Split stage: grouped, stratified, seeded train/val/test split plus k-fold CV folds.

Whole groups (fields of view) are assigned greedily, largest first, to whichever part
moves the per-class counts closest to their targets. Stratifying on the original class
also balances the label, and keeps rare classes (e.g. normal_columnar) on every side.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from pipeline import atomic
from pipeline.config import SPLITS, SplitConfig
from pipeline.data.manifest import MANIFEST_COLUMNS, SPLIT_COLUMNS, read_table
from pipeline.errors import CytopipeError


class SplitError(CytopipeError, RuntimeError):
    """The data cannot be split as asked, or a split broke an invariant."""


def assign_groups(group_counts: dict[str, Counter], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign each group to one part so that per-key counts match `fractions` as closely as possible.

    group_counts: group -> Counter of stratification keys for its rows.
    Returns group -> part name. Deterministic for a given seed.
    """
    totals: Counter = Counter()
    for counts in group_counts.values():
        totals.update(counts)
    keys = sorted(totals)
    parts = list(fractions)
    target = {p: {k: fractions[p] * totals[k] for k in keys} for p in parts}
    current = {p: Counter() for p in parts}

    order = sorted(group_counts)
    random.Random(seed).shuffle(order)
    # Big groups first (they are the hard ones to place); the seeded shuffle breaks ties.
    order.sort(key=lambda g: -sum(group_counts[g].values()))

    assignment = {}
    for g in order:
        v = group_counts[g]

        def cost_increase(p: str) -> float:
            # Change in sum_k ((cur + v - target) / total)^2, weighted so rare keys count as much.
            return sum((v[k] ** 2 + 2 * v[k] * (current[p][k] - target[p][k])) / totals[k] ** 2 for k in v)

        deficit = {p: sum(target[p].values()) - sum(current[p].values()) for p in parts}
        best = min(parts, key=lambda p: (round(cost_increase(p), 12), -deficit[p]))
        assignment[g] = best
        current[best].update(v)
    return assignment


def _group_counts(frame, key: str) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, value in zip(frame["group"], frame[key]):
        counts[group][value] += 1
    return counts


def split_frame(manifest, config: SplitConfig):
    """Return the manifest with `split` (train/val/test) and `fold` (CV fold of train+val; -1 on test)."""
    frame = manifest.copy()
    if frame.empty:
        raise SplitError("the manifest is empty: nothing to split")
    parts = assign_groups(_group_counts(frame, "original_class"), dict(config.fractions), config.seed)
    frame["split"] = frame["group"].map(parts)
    frame["fold"] = -1
    if config.folds:
        dev = frame[frame["split"] != "test"]
        n_groups = dev["group"].nunique()
        if n_groups < config.folds:
            raise SplitError(f"split.folds={config.folds} but train+val has only {n_groups} groups")
        fold_names = {str(i): 1.0 / config.folds for i in range(config.folds)}
        folds = assign_groups(_group_counts(dev, "original_class"), fold_names, config.seed)
        frame.loc[dev.index, "fold"] = dev["group"].map(folds).astype(int)
    check_split(frame, config.folds)
    return frame[list(SPLIT_COLUMNS)]


def check_split(frame, folds: int = 0) -> None:
    """Raise SplitError unless groups never cross parts and every part holds every label."""
    labels = set(frame["label"])
    per_group = frame.groupby("group")["split"].nunique()
    crossing = sorted(per_group[per_group > 1].index)
    if crossing:
        raise SplitError(f"groups on more than one side of the split: {', '.join(crossing[:10])}")
    for part in SPLITS:
        have = set(frame.loc[frame["split"] == part, "label"])
        if have != labels:
            missing = ", ".join(sorted(labels - have))
            raise SplitError(
                f"split '{part}' has no image labelled {missing}: too few groups for these "
                f"fractions; add data or change split.fractions"
            )
    if folds:
        dev = frame[frame["split"] != "test"]
        if (dev.groupby("group")["fold"].nunique() > 1).any():
            raise SplitError("a group spans two CV folds")
        for fold in range(folds):
            have = set(dev.loc[dev["fold"] == fold, "label"])
            if have != labels:
                raise SplitError(
                    f"CV fold {fold} has no image labelled {', '.join(sorted(labels - have))}; lower split.folds"
                )


def summary_table(frame) -> str:
    """Counts per split x label x original class, as fixed-width text."""
    import pandas as pd

    table = pd.crosstab([frame["label"], frame["original_class"]], frame["split"], margins=True, margins_name="total")
    table = table.reindex(columns=[c for c in (*SPLITS, "total") if c in table.columns])
    return table.to_string()


def summary(frame, folds: int) -> dict:
    out = {}
    for part in SPLITS:
        sub = frame[frame["split"] == part]
        out[part] = {
            "n_images": int(len(sub)),
            "n_groups": int(sub["group"].nunique()),
            "labels": {k: int(v) for k, v in sorted(sub["label"].value_counts().items())},
        }
    if folds:
        dev = frame[frame["split"] != "test"]
        out["folds"] = {str(f): int((dev["fold"] == f).sum()) for f in range(folds)}
    return out


def run(manifest_path: str | Path, config: SplitConfig, out_dir: str | Path) -> dict:
    """The stage: read the manifest, split, check, write split.csv + summary.json, print the table."""

    frame = split_frame(read_table(manifest_path, MANIFEST_COLUMNS), config)
    out_dir = Path(out_dir)
    atomic.write_csv(out_dir / "split.csv", frame)
    result = summary(frame, config.folds)
    atomic.write_json(out_dir / "summary.json", result)
    print(summary_table(frame))
    parts = ", ".join(f"{p} {result[p]['n_images']} ({result[p]['n_groups']} groups)" for p in SPLITS)
    print(
        f"split: {parts}; seed {config.seed}"
        + (f"; {config.folds} CV folds over train+val" if config.folds else "")
        + f" -> {out_dir / 'split.csv'}"
    )
    return result
