"""Measure P(malignant) against labels: metrics with group-bootstrap CIs, calls per original class,
the plot files DVC renders, and the one-line summaries the stages print. Used by the evaluate
stage (pipeline/evaluate.py) and by measuring any labelled folder (pipeline/evaluate_folder.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.calibration import Band
from pipeline.config import EvaluateConfig
from pipeline.data.images import ImageError, load_rgb
from pipeline.errors import CytopipeError
from pipeline.metrics import calls_by_class, metrics_with_ci, reliability_curve

GLANDULAR_BENIGN = "normal_columnar"  # Herlev's benign glandular cells: their FPR is reported alone


class EvaluationError(CytopipeError, RuntimeError):
    """Evaluation cannot go on (no usable images, one class only...). One line."""


def load_images(paths: list[Path]) -> tuple[list[np.ndarray], list[str | None]]:
    """RGB arrays (None where unreadable) and one error message per path (None where fine)."""
    from tqdm import tqdm

    images, errors = [], []
    for p in tqdm(paths, desc="read", unit="img", disable=None, file=sys.stderr, leave=False):
        try:
            images.append(np.asarray(load_rgb(p)))
            errors.append(None)
        except ImageError as exc:
            images.append(None)
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd file must not abort the evaluation
            images.append(None)
            first = (str(exc).splitlines() or [""])[0]
            errors.append(f"{p}: cannot read: {type(exc).__name__}{': ' + first if first else ''}")
    return images, errors


def logit_columns(labels, prefix: str = "logit_") -> list[str]:
    """The columns of out-of-fold logits in the cv stage's oof.csv (`tta_logit_` for the 8-view mean)."""
    return [f"{prefix}{label}" for label in labels]


def positive_targets(labels: list[str], positive_labels: list[str]) -> np.ndarray:
    return np.array([label in positive_labels for label in labels], dtype=int)


def measure(
    y: np.ndarray,
    p: np.ndarray,
    groups: list[str],
    classes: list[str],
    calibration: dict,
    cfg: EvaluateConfig,
    seed: int = 0,
) -> dict:
    """Test metrics with group-bootstrap CIs, coverage, and calls per original class."""
    if len(set(y.tolist())) < 2:
        raise EvaluationError("the evaluated cases hold one class only: AUC and sensitivity/specificity are undefined")
    band = Band(calibration["threshold"], calibration["band_width"])
    metrics = metrics_with_ci(y, p, np.asarray(groups), band.threshold, n_boot=cfg.bootstrap, seed=seed)
    calls = band.call(p)
    definite = calls != "indeterminate"
    out = {
        "n": int(len(y)),
        "n_groups": int(len(set(groups))),
        "threshold": band.threshold,
        "metrics": metrics,
        "coverage": float(definite.mean()),
        "by_class": calls_by_class(np.asarray(classes), p, band.threshold, band.lower, band.upper),
    }
    if definite.any():
        called = calls[definite] == "malignant"
        yd = y[definite]
        out["definite_calls"] = {
            "n": int(definite.sum()),
            "sensitivity": float(called[yd == 1].mean()) if (yd == 1).any() else float("nan"),
            "specificity": float((~called[yd == 0]).mean()) if (yd == 0).any() else float("nan"),
        }
    glandular = np.asarray(classes) == GLANDULAR_BENIGN
    if glandular.any():
        out["normal_columnar_fpr"] = float((p[glandular] >= band.threshold).mean())
    return out


def write_plots(out_dir: Path, y: np.ndarray, p: np.ndarray, calls: np.ndarray, bins: int) -> list[Path]:
    """ROC, PR, confusion and reliability data as CSV files for `dvc plots`."""
    import pandas as pd
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    files = {
        "roc.csv": pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}),
        "pr.csv": pd.DataFrame({"recall": recall, "precision": precision}),
        "confusion.csv": pd.DataFrame({"actual": np.where(y == 1, "malignant", "benign"), "predicted": calls}),
        "reliability.csv": pd.DataFrame(reliability_curve(y, p, bins)),
    }
    written = []
    for name, frame in files.items():
        atomic.write_csv(out_dir / name, frame)
        written.append(out_dir / name)
    return written


def flat_metrics(result: dict, prefix: str) -> dict[str, float]:
    flat = {}
    for name, m in result["metrics"].items():
        flat[f"{prefix}{name}"] = m["value"]
        flat[f"{prefix}{name}_ci_low"] = m["ci_low"]
        flat[f"{prefix}{name}_ci_high"] = m["ci_high"]
    flat[f"{prefix}coverage"] = result["coverage"]
    if "normal_columnar_fpr" in result:
        flat[f"{prefix}normal_columnar_fpr"] = result["normal_columnar_fpr"]
    return flat


def summary_line(name: str, result: dict) -> str:
    m = result["metrics"]
    parts = [
        f"{k} {m[k]['value']:.3f} [{m[k]['ci_low']:.3f}, {m[k]['ci_high']:.3f}]"
        for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")
    ]
    return f"{name}: n={result['n']}  " + "  ".join(parts) + f"  coverage {result['coverage']:.3f}"
