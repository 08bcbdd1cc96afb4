"""Cross-validation stage: grouped, stratified k-fold over train+val (the test split stays untouched).

Each fold trains the shipped recipe (the train section: same schedule, `keep: last`) on the other
folds and predicts its held-out fold, so every train+val cell gets exactly one out-of-fold (OOF)
prediction from a model that never saw its group. Those ~613 predictions, not the 109 val cells,
are what the evaluate stage calibrates on and what promotion judges (pipeline/promotion.py).

Outputs (reports_dir):
- oof.csv: one row per train+val cell: path, group, labels, fold, raw logits (single view and
  8-view TTA) and the OOD score of a guard fitted on that fold's own training cells.
- oof_features.npz: the pooled penultimate features of the same rows, in the same order (no pickle).
- metrics.json: pooled OOF metrics with group-bootstrap CIs, and mean ± sd over folds.
- folds.csv (per fold), epochs.csv (held-out AUC per epoch, mean ± sd over folds).
MLflow gets a parent run `cv` with one child run per fold.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import numpy as np

from pipeline import atomic, ood, tracking
from pipeline.calibration import choose_threshold, fit_temperature, malignant_probability
from pipeline.config import Params
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.errors import CytopipeError
from pipeline.inference.predictor import TorchPredictor
from pipeline.measurement import load_images, logit_columns
from pipeline.metrics import metrics_with_ci
from pipeline.train import fit

OOF_FILE = "oof.csv"
FEATURES_FILE = "oof_features.npz"


class CvError(CytopipeError, RuntimeError):
    """Cross-validation cannot run as configured. One line."""


def fold_split(split, fold: int):
    """The split frame for one fold: held-out fold -> val, other dev folds -> train, test dropped."""
    dev = split[split["split"] != "test"].copy()
    dev["split"] = ["val" if f == fold else "train" for f in dev["fold"]]
    return dev


def fold_params(params: Params) -> Params:
    """The shipped recipe on one fold: train on the other folds, keep the last epoch (the held-out
    fold is watched, never used to pick), `cv.epochs` overriding the schedule only when set."""
    epochs = params.cv.epochs or params.train.epochs
    train = dataclasses.replace(params.train, epochs=epochs, fit_on="train", keep="last")
    return dataclasses.replace(params, train=train)


def _check_labels(labels, positive_labels) -> None:
    unknown = [x for x in positive_labels if x not in labels]
    if unknown:
        raise CvError(f"evaluate.positive_labels {unknown} are not labels of the model {list(labels)}")


def predict_heldout(model_dir: Path, heldout_images, train_images, train_labels, params: Params) -> dict:
    """One fold model's held-out outputs: logits (single view and TTA), pooled features, and OOD
    scores from a guard fitted on the fold's own training cells (the shipped view setting)."""
    predictor = TorchPredictor(model_dir)
    tta = params.evaluate.tta
    logits, feats = predictor.image_outputs(heldout_images, tta=False)
    tta_logits, tta_feats = predictor.image_outputs(heldout_images, tta=True)
    shipped_logits, shipped_feats = (tta_logits, tta_feats) if tta else (logits, feats)
    cfg = params.ood
    ood_scores = np.full(len(heldout_images), np.nan)
    if cfg.method == "energy" or shipped_feats is not None:
        train_logits, train_feats = predictor.image_outputs(train_images, tta=tta)
        idx = np.array([predictor.labels.index(x) for x in train_labels])
        guard = ood.fit_configured(train_feats, idx, cfg)
        ood_scores = ood.score(guard, shipped_feats, shipped_logits)
    return {
        "logits": logits,
        "tta_logits": tta_logits,
        "features": shipped_feats,
        "ood_score": ood_scores,
        "labels": predictor.labels,
    }


def pooled_metrics(oof, labels, params: Params) -> dict:
    """Pooled OOF metrics with group-bootstrap 95% CIs, at the operating point the evaluate stage
    would fit on these same predictions (temperature, then the threshold rule)."""
    cfg = params.evaluate
    view = "tta_logit_" if cfg.tta else "logit_"
    logits = oof[logit_columns(labels, view)].to_numpy(float)
    idx = np.array([list(labels).index(x) for x in oof["label"]])
    temperature = fit_temperature(logits, idx)
    y = oof["label"].isin(cfg.positive_labels).to_numpy().astype(int)
    p = malignant_probability(logits, labels, cfg.positive_labels, temperature)
    chosen = choose_threshold(y, p, cfg.threshold_rule, cfg.target_sensitivity)
    ci = metrics_with_ci(
        y, p, oof["group"].astype(str).to_numpy(), chosen["threshold"], n_boot=cfg.bootstrap, seed=params.split.seed
    )
    out = {
        "n": int(len(oof)),
        "n_groups": int(oof["group"].nunique()),
        "tta": bool(cfg.tta),
        "temperature": temperature,
        "threshold": chosen["threshold"],
        "threshold_rule": cfg.threshold_rule,
    }
    for name, m in ci.items():
        out[name] = m["value"]
        out[f"{name}_ci_low"] = m["ci_low"]
        out[f"{name}_ci_high"] = m["ci_high"]
    return out


def fold_summary(rows: list[dict], keys=("auc", "balanced_accuracy")) -> dict:
    """Mean ± sd over folds of each per-fold metric."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def epoch_curve(histories: list[list[dict]]):
    """Held-out AUC per epoch, mean ± sd over folds: the evidence for the schedule's length."""
    import pandas as pd

    frame = pd.concat([pd.DataFrame(h).assign(fold=i) for i, h in enumerate(histories)])
    grouped = frame.groupby("epoch")
    return pd.DataFrame(
        {
            "epoch": grouped.size().index,
            "heldout_auc_mean": grouped["val_auc"].mean().to_numpy(),
            "heldout_auc_sd": grouped["val_auc"].std().fillna(0).to_numpy(),
            "train_loss_mean": grouped["train_loss"].mean().to_numpy(),
        }
    )


def _load_dev_images(split, root: Path) -> dict[str, np.ndarray]:
    dev = split[split["split"] != "test"]
    images, errors = load_images([root / p for p in dev["path"]])
    bad = [e for e in errors if e]
    if bad:
        raise CvError(f"{len(bad)} image(s) unreadable since ingest, e.g. {bad[0]}; rerun `dvc repro`")
    return dict(zip(dev["path"], images))


def write_reports(
    reports_dir: Path, oof, features: list[np.ndarray], rows: list[dict], histories: list, summary: dict
) -> None:
    """oof.csv, oof_features.npz, folds.csv, epochs.csv and metrics.json."""
    import pandas as pd

    atomic.write_csv(reports_dir / OOF_FILE, oof)
    with atomic.atomic_path(reports_dir / FEATURES_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                path=oof["path"].to_numpy(str),
                features=np.concatenate(features) if features else np.zeros((len(oof), 0)),
            )
    atomic.write_csv(reports_dir / "folds.csv", pd.DataFrame(rows))
    atomic.write_csv(reports_dir / "epochs.csv", epoch_curve(histories))
    atomic.write_json(reports_dir / "metrics.json", summary)


def _run_fold(fold, split, images, params, fparams, split_csv, work_dir, log):
    """Train one fold on its training cells and predict its held-out ones; returns the held-out rows
    with logits and OOD scores, their features (or None), the epoch history and the fold's summary row."""
    fold_dir = Path(work_dir) / f"fold{fold}"
    fold_csv = fold_dir / "split.csv"
    frame = fold_split(split, fold)
    atomic.write_csv(fold_csv, frame)
    tracker = tracking.TrainingTracker(params.mlflow, {"split": Path(split_csv)}, nested=True, run_name=f"fold {fold}")
    try:
        result = fit(fparams, fold_csv, fold_dir / "model", fold_dir / "checkpoints", "auto", tracker, log)
    except BaseException:
        tracker.end("FAILED")
        raise
    heldout, trained = frame[frame["split"] == "val"], frame[frame["split"] == "train"]
    out = predict_heldout(
        fold_dir / "model",
        [images[p] for p in heldout["path"]],
        [images[p] for p in trained["path"]],
        list(trained["label"]),
        params,
    )
    labels = out["labels"]
    _check_labels(labels, params.evaluate.positive_labels)
    part = heldout[["path", "group", "original_class", "label"]].reset_index(drop=True).assign(fold=fold)
    part[logit_columns(labels)] = out["logits"]
    part[logit_columns(labels, "tta_logit_")] = out["tta_logits"]
    part["ood_score"] = out["ood_score"]
    features = None if out["features"] is None else out["features"].astype(np.float32)
    last = result.history[-1]
    row = {
        "fold": fold,
        "auc": last["val_auc"],
        "balanced_accuracy": last["val_balanced_accuracy"],
        "loss": last["val_loss"],
        "n_heldout": len(heldout),
        "epochs": result.epochs_run,
    }
    tracker.run.log_metrics(
        {"heldout_auc": row["auc"], "heldout_balanced_accuracy": row["balanced_accuracy"]}, step=last["epoch"]
    )
    tracker.end("FINISHED")
    return part, features, result.history, row, labels


def run(params: Params, split_csv: Path, reports_dir: Path, work_dir: Path, log=print) -> dict:
    """Train every fold, predict its held-out cells; write oof.csv, oof_features.npz, folds.csv,
    epochs.csv and metrics.json into reports_dir."""
    import pandas as pd

    split = read_table(split_csv, SPLIT_COLUMNS)
    folds = sorted(int(f) for f in set(split.loc[split["split"] != "test", "fold"]) if int(f) >= 0)
    if len(folds) < 2:
        raise CvError(f"{split_csv}: no CV folds (set split.folds >= 2 and rerun the split stage)")
    fparams = fold_params(params)
    images = _load_dev_images(split, params.data.root)
    parent = tracking.Run(params.mlflow, run_name="cv", tags={"cv.folds": str(len(folds))})
    rows, parts, features, histories = [], [], [], []
    try:
        parent.log_params(
            {
                "cv": dataclasses.asdict(params.cv),
                "model": dataclasses.asdict(params.model),
                "train": dataclasses.asdict(fparams.train),
            }
        )
        for fold in folds:
            log(f"cv: fold {fold} ({len(folds)} folds, {fparams.train.epochs} epochs)")
            part, feats, history, row, labels = _run_fold(
                fold, split, images, params, fparams, split_csv, work_dir, log
            )
            parts.append(part)
            if feats is not None:
                features.append(feats)
            histories.append(history)
            rows.append(row)
            log(f"cv: fold {fold}: held-out AUC {row['auc']:.4f}, balanced accuracy {row['balanced_accuracy']:.4f}")
        oof = pd.concat(parts, ignore_index=True)
        summary = {
            "folds": len(rows),
            "epochs": fparams.train.epochs,
            "epochs_run": max(r["epochs"] for r in rows),  # more than `epochs` when min_steps asks
            "min_steps": fparams.train.min_steps,
            **fold_summary(rows),
            "oof": pooled_metrics(oof, labels, params),
        }
        reports_dir = Path(reports_dir)
        write_reports(reports_dir, oof, features, rows, histories, summary)
        _log_summary(parent, reports_dir, summary)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    o = summary["oof"]
    log(
        f"cv: out-of-fold AUC {o['roc_auc']:.4f} [{o['roc_auc_ci_low']:.4f}, {o['roc_auc_ci_high']:.4f}] over "
        f"{o['n']} cells, specificity {o['specificity']:.3f} at sensitivity {o['sensitivity']:.3f}; per fold AUC "
        f"{summary['auc_mean']:.4f} ± {summary['auc_sd']:.4f}, balanced accuracy "
        f"{summary['balanced_accuracy_mean']:.4f} ± {summary['balanced_accuracy_sd']:.4f}"
    )
    return summary


def _log_summary(parent, reports_dir: Path, summary: dict) -> None:
    """Log the fold means/sds, the pooled out-of-fold metrics and the report files to the parent run."""
    parent.log_metrics({f"cv_{k}": v for k, v in summary.items() if k.endswith(("_mean", "_sd"))}, step=0)
    parent.log_metrics(
        {f"oof_{k}": v for k, v in summary["oof"].items() if isinstance(v, float) and np.isfinite(v)}, step=0
    )
    for name in ("folds.csv", "epochs.csv", OOF_FILE, "metrics.json"):
        parent.log_artifact(reports_dir / name, "cv")
