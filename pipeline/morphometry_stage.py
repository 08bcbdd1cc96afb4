"""The morphometry stage: nuclear features of every ingested cell, both atypia scores measured as the
network is (out of fold over train+val, then on test, AUC with group-bootstrap 95% CIs), the logistic
atypia model fitted on the train split (models/atypia/atypia.json, JSON coefficients), whether the
network gains from the atypia score (a stack of the two, out of fold), and a contact sheet of the
segmentation on 50 cells for a person to review (reports/morphometry/contact_sheet.png, kept by DVC).

Cells whose nucleus could not be measured get the median score of the measured ones in the AUCs, so that
every candidate is judged on the same cells as the network; metrics.json gives how many were measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import atomic
from pipeline.config import Params
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.errors import CytopipeError
from pipeline.measurement import load_images, logit_columns
from pipeline.metrics import metrics_with_ci
from pipeline.morphometry.atypia import ATYPIA_FILE, LogisticAtypia
from pipeline.morphometry.cells import measure_images, nucleus_outline
from pipeline.morphometry.features import COLUMNS
from pipeline.morphometry.inputs import plain_image_input
from pipeline.morphometry.segmentation import SegmentationSettings

CONTACT_SHEET_CELLS = 50


class MorphometryStageError(CytopipeError):
    """The morphometry stage cannot run on these inputs."""


def _auc(y, score, groups, params: Params) -> dict:
    """ROC AUC with its group-bootstrap 95% CI; unmeasured cells (NaN) take the measured median."""
    score = np.asarray(score, float)
    measured = np.isfinite(score)
    filled = np.where(measured, score, np.nanmedian(score) if measured.any() else 0.5)
    ci = metrics_with_ci(y, filled, groups, 0.5, n_boot=params.evaluate.bootstrap, seed=params.split.seed)
    auc = ci["roc_auc"]
    return {
        "auc": auc["value"],
        "auc_ci_low": auc["ci_low"],
        "auc_ci_high": auc["ci_high"],
        "n": int(len(y)),
        "n_measured": int(measured.sum()),
    }


def _logistic_out_of_fold(features, y, split: pd.DataFrame) -> np.ndarray:
    """Each train+val cell scored by a logistic model fitted on the other folds' cells."""
    dev = (split["split"] != "test").to_numpy()
    folds = split["fold"].to_numpy(int)
    out = np.full(len(split), np.nan)
    for fold in sorted(set(folds[dev]) - {-1}):
        held, fit_rows = dev & (folds == fold), dev & (folds != fold)
        model = LogisticAtypia.fit(features[fit_rows], y[fit_rows], f"folds other than {fold}")
        out[held] = model.score(features[held])
    return out


def _network_plus_atypia(oof: pd.DataFrame, atypia: np.ndarray, y, groups, params: Params) -> dict:
    """Out-of-fold AUC of the network alone and of a logistic stack of (network logit margin, atypia),
    the stack fitted on the other folds' out-of-fold rows: does the atypia score add anything?"""
    from sklearn.linear_model import LogisticRegression

    labels = [c[len("logit_") :] for c in oof.columns if c.startswith("logit_")]
    logits = oof[logit_columns(labels)].to_numpy(float)
    positive = [labels.index(label) for label in params.evaluate.positive_labels if label in labels]
    margin = logits[:, positive].max(axis=1) - np.delete(logits, positive, axis=1).max(axis=1)
    filled = np.where(np.isfinite(atypia), atypia, np.nanmedian(atypia))
    x = np.column_stack([margin, filled])
    stacked = np.full(len(oof), np.nan)
    folds = oof["fold"].to_numpy(int)
    for fold in sorted(set(folds)):
        held = folds == fold
        model = LogisticRegression(max_iter=1000).fit(x[~held], y[~held])
        stacked[held] = model.decision_function(x[held])
    return {"network": _auc(y, margin, groups, params), "network_plus_atypia": _auc(y, stacked, groups, params)}


def run(params: Params, split_csv: Path, oof_csv: Path | None, out_dir: Path, reports_dir: Path, log=print) -> dict:
    """Measure every cell, fit and judge both atypia scores; write atypia.json into out_dir and
    features.csv, metrics.json and contact_sheet.png into reports_dir. Returns the metrics."""
    cfg = params.morphometry
    split = read_table(split_csv, SPLIT_COLUMNS).reset_index(drop=True)
    images, errors = load_images([params.data.root / p for p in split["path"]])
    bad = [e for e in errors if e]
    if bad:
        raise MorphometryStageError(f"{len(bad)} image(s) unreadable since ingest, e.g. {bad[0]}; rerun `dvc repro`")
    log(f"morphometry: measuring {len(images)} cells at {cfg.size} px")
    features, nuclei = measure_images(images, cfg.size, SegmentationSettings.of(cfg))
    y = split["label"].isin(params.evaluate.positive_labels).to_numpy().astype(int)
    groups = split["group"].astype(str).to_numpy()
    dev, test, train = (
        (split["split"] != "test").to_numpy(),
        (split["split"] == "test").to_numpy(),
        (split["split"] == "train").to_numpy(),
    )

    model = LogisticAtypia.fit(features[train], y[train], "train split")
    logistic_oof = _logistic_out_of_fold(features, y, split)
    criteria = features["atypia_criteria"].to_numpy(float)
    metrics = {
        "n_cells": int(len(split)),
        "not_measured": {str(k): int(v) for k, v in features["morph_reason"].value_counts().items() if k},
        "criteria": {
            "oof": _auc(y[dev], criteria[dev], groups[dev], params),
            "test": _auc(y[test], criteria[test], groups[test], params),
        },
        "logistic": {
            "oof": _auc(y[dev], logistic_oof[dev], groups[dev], params),
            "test": _auc(y[test], model.score(features[test]), groups[test], params),
            "coefficients": dict(zip(model.features, model.coef)),
        },
        "shipped": cfg.atypia,
    }
    if oof_csv is not None and Path(oof_csv).is_file():
        oof = pd.read_csv(oof_csv)
        rows = pd.Series(np.arange(len(split)), index=split["path"]).reindex(oof["path"]).to_numpy()
        metrics["stack_oof"] = _network_plus_atypia(oof, criteria[rows], y[rows], groups[rows], params)

    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    model.write(out_dir / ATYPIA_FILE)
    table = pd.concat([split[["path", "group", "original_class", "label", "split", "fold"]], features], axis=1)
    table["atypia_logistic"] = model.score(features)
    atomic.write_csv(
        reports_dir / "features.csv", table[[*table.columns[:6], *COLUMNS, "atypia_criteria", "atypia_logistic"]]
    )
    atomic.write_json(reports_dir / "metrics.json", metrics)
    write_contact_sheet(reports_dir / "contact_sheet.png", images, nuclei, split, features, cfg.size)
    for name in ("criteria", "logistic"):
        m = metrics[name]
        log(
            f"morphometry: {name} atypia AUC out of fold {m['oof']['auc']:.4f} [{m['oof']['auc_ci_low']:.4f}, "
            f"{m['oof']['auc_ci_high']:.4f}], test {m['test']['auc']:.4f} [{m['test']['auc_ci_low']:.4f}, "
            f"{m['test']['auc_ci_high']:.4f}]"
        )
    return metrics


def write_contact_sheet(path: Path, images, nuclei, split: pd.DataFrame, features: pd.DataFrame, size: int) -> None:
    """CONTACT_SHEET_CELLS cells spread over the classes (every k-th cell of the split, in path order), each
    with its nucleus outline and its N/C ratio, 10 to a row: what a reviewer checks the segmentation on."""
    import cv2
    from PIL import Image

    order = np.argsort(split["path"].to_numpy())
    picked = order[:: max(1, len(order) // CONTACT_SHEET_CELLS)][:CONTACT_SHEET_CELLS]
    tiles = []
    for i in picked:
        crop, _, _ = plain_image_input(images[i], size)
        tile = nucleus_outline(crop, nuclei[i])
        nc = features["nc_ratio"].iloc[i]
        text = f"{split['original_class'].iloc[i][:10]} {'--' if np.isnan(nc) else f'{nc:.2f}'}"
        cv2.putText(tile, text, (2, 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
        tiles.append(tile)
    while len(tiles) % 10:
        tiles.append(np.full((size, size, 3), 255, np.uint8))
    rows = [np.concatenate(tiles[r : r + 10], axis=1) for r in range(0, len(tiles), 10)]
    with atomic.atomic_path(Path(path)) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
