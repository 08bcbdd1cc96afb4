"""Cross-validation stage: grouped, stratified k-fold over train+val (the test split stays untouched).

Each fold trains on the other folds for a fixed number of epochs (`cv.epochs`: no early stopping,
so the held-out fold is never used to pick a model) and is measured on its held-out fold.
MLflow gets a parent run `cv` with one child run per fold.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from pipeline import atomic
from pipeline.config import Params
from pipeline.data.manifest import SPLIT_COLUMNS, read_table


class CvError(RuntimeError):
    """Cross-validation cannot run as configured. One line."""


def fold_split(split, fold: int):
    """The split frame for one fold: held-out fold -> val, other dev folds -> train, test dropped."""
    dev = split[split["split"] != "test"].copy()
    dev["split"] = ["val" if f == fold else "train" for f in dev["fold"]]
    return dev


def fold_params(params: Params) -> Params:
    epochs = params.cv.epochs
    return dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=epochs, patience=epochs + 1))


def run(params: Params, split_csv: Path, reports_dir: Path, work_dir: Path, log=print) -> dict:
    """Train and measure every fold; write reports_dir/metrics.json (mean ± sd) and folds.csv."""
    import pandas as pd

    from pipeline import tracking
    from pipeline.train import fit

    split = read_table(split_csv, SPLIT_COLUMNS)
    folds = sorted(int(f) for f in set(split.loc[split["split"] != "test", "fold"]) if int(f) >= 0)
    if len(folds) < 2:
        raise CvError(f"{split_csv}: no CV folds (set split.folds >= 2 and rerun the split stage)")
    fparams = fold_params(params)
    parent = tracking.Run(params.mlflow, run_name="cv", tags={"cv.folds": str(len(folds))})
    rows = []
    try:
        parent.log_params({"cv": dataclasses.asdict(params.cv), "model": dataclasses.asdict(params.model),
                           "train": dataclasses.asdict(fparams.train)})
        for fold in folds:
            fold_dir = Path(work_dir) / f"fold{fold}"
            fold_csv = fold_dir / "split.csv"
            atomic.write_csv(fold_csv, fold_split(split, fold))
            tracker = tracking.TrainingTracker(params.mlflow, {"split": Path(split_csv)}, nested=True,
                                               run_name=f"fold {fold}")
            log(f"cv: fold {fold} ({len(folds)} folds, {fparams.train.epochs} epochs)")
            try:
                result = fit(fparams, fold_csv, fold_dir / "model", fold_dir / "checkpoints", "auto", tracker, log)
            except BaseException:
                tracker.end("FAILED")
                raise
            last = result.history[-1]
            row = {"fold": fold, "auc": last["val_auc"], "balanced_accuracy": last["val_balanced_accuracy"],
                   "loss": last["val_loss"], "n_heldout": int((fold_split(split, fold)["split"] == "val").sum())}
            tracker.run.log_metrics({"heldout_auc": row["auc"], "heldout_balanced_accuracy": row["balanced_accuracy"]},
                                    step=last["epoch"])
            tracker.end("FINISHED")
            rows.append(row)
            log(f"cv: fold {fold}: held-out AUC {row['auc']:.4f}, balanced accuracy {row['balanced_accuracy']:.4f}")
        summary = {"folds": len(rows), "epochs": fparams.train.epochs}
        for key in ("auc", "balanced_accuracy"):
            values = [r[key] for r in rows]
            summary[f"{key}_mean"] = statistics.fmean(values)
            summary[f"{key}_sd"] = statistics.stdev(values)
        parent.log_metrics({f"cv_{k}": v for k, v in summary.items() if k.endswith(("_mean", "_sd"))}, step=0)
        reports_dir = Path(reports_dir)
        atomic.write_csv(reports_dir / "folds.csv", pd.DataFrame(rows))
        atomic.write_json(reports_dir / "metrics.json", summary)
        parent.log_artifact(reports_dir / "folds.csv", "cv")
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    log(f"cv: AUC {summary['auc_mean']:.4f} ± {summary['auc_sd']:.4f}, balanced accuracy "
        f"{summary['balanced_accuracy_mean']:.4f} ± {summary['balanced_accuracy_sd']:.4f} over {len(rows)} folds")
    return summary
