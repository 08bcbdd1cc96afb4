"""Evaluate stage: calibrate on held-out predictions, measure on test with group-bootstrap CIs, promote.

- Temperature, threshold, indeterminate band and the OOD threshold are fitted only on predictions
  of models that did not train on those cells: the cv stage's out-of-fold predictions (`oof_csv`,
  ~613 cells, the same recipe as the shipped model), or, without them, the validation split
  (only for a model that did not train on it).
- Every metric on test gets a 95% CI from a bootstrap that resamples groups, not cells.
- The calibrated model folder (weights + model.json with a `calibration` block) is what every
  later command loads; it is also registered in MLflow.
`evaluate_folder()` measures any labelled folder with an existing model, without retraining.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import EXCLUDE, EvaluateConfig, LabelMap, OodConfig, Params
from pipeline.data.images import ImageError, load_rgb
from pipeline.data.manifest import SPLIT_COLUMNS, read_table

GLANDULAR_BENIGN = "normal_columnar"  # Herlev's benign glandular cells: their FPR is reported alone


class EvaluationError(RuntimeError):
    """Evaluation cannot go on (no usable images, one class only...). One line."""


@dataclass
class Cases:
    """Cases to score: parallel lists."""

    paths: list[str]
    groups: list[str]
    original_class: list[str]
    label: list[str]


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


def positive_targets(labels: list[str], positive_labels: list[str]) -> np.ndarray:
    return np.array([label in positive_labels for label in labels], dtype=int)


def calibrate(logits: np.ndarray, label_idx: np.ndarray, y_pos: np.ndarray, predictor, cfg: EvaluateConfig,
              tta: bool) -> dict:
    """Temperature + threshold + band from validation logits; returns the model's `calibration` block."""
    from pipeline.calibration import Band, choose_threshold, fit_temperature, nll, softmax
    from pipeline.metrics import expected_calibration_error

    temperature = fit_temperature(logits, label_idx)
    idx = [predictor.labels.index(x) for x in cfg.positive_labels]
    p_raw = softmax(logits)[:, idx].sum(1)
    p_cal = softmax(logits, temperature)[:, idx].sum(1)
    chosen = choose_threshold(y_pos, p_cal, cfg.threshold_rule, cfg.target_sensitivity)
    band = Band(chosen["threshold"], cfg.band_width)
    return {
        "temperature": float(temperature), "tta": bool(tta), "positive_labels": list(cfg.positive_labels),
        "threshold": float(band.threshold), "threshold_rule": cfg.threshold_rule,
        "target_sensitivity": cfg.target_sensitivity if cfg.threshold_rule == "sensitivity" else None,
        "band_width": cfg.band_width, "band": [band.lower, band.upper],
        "validation": {
            "n": int(len(y_pos)), "sensitivity": chosen["sensitivity"], "specificity": chosen["specificity"],
            "nll_before": nll(logits, label_idx), "nll_after": nll(logits, label_idx, temperature),
            "ece_before": expected_calibration_error(y_pos, p_raw, cfg.ece_bins),
            "ece_after": expected_calibration_error(y_pos, p_cal, cfg.ece_bins),
            "coverage": band.coverage(p_cal),
        },
    }


def fit_guard(train: tuple[np.ndarray, np.ndarray | None], train_idx: np.ndarray,
              held_out, cfg: OodConfig, log=print) -> dict | None:
    """The OOD guard: fitted on the training cells' (logits, features), thresholded on held-out
    cells: their (logits, features) under this guard, or scores already computed out of fold.
    None when the backbone gives no pooled features and the method needs them."""
    from pipeline import ood

    if cfg.method != "energy" and train[1] is None:
        log(f"warning: the model gives no pooled features; no {cfg.method} OOD guard is fitted")
        return None
    params = ood.fit_configured(train[1], train_idx, cfg)
    scores = held_out if isinstance(held_out, np.ndarray) else ood.score(params, held_out[1], held_out[0])
    return ood.set_threshold(params, scores, cfg.pass_rate)


def measure(y: np.ndarray, p: np.ndarray, groups: list[str], classes: list[str], calibration: dict,
            cfg: EvaluateConfig, seed: int = 0) -> dict:
    """Test metrics with group-bootstrap CIs, coverage, and calls per original class."""
    from pipeline.calibration import Band
    from pipeline.metrics import calls_by_class, metrics_with_ci

    if len(set(y.tolist())) < 2:
        raise EvaluationError("the evaluated cases hold one class only: AUC and sensitivity/specificity are undefined")
    band = Band(calibration["threshold"], calibration["band_width"])
    metrics = metrics_with_ci(y, p, np.asarray(groups), band.threshold, n_boot=cfg.bootstrap, seed=seed)
    calls = band.call(p)
    definite = calls != "indeterminate"
    out = {"n": int(len(y)), "n_groups": int(len(set(groups))), "threshold": band.threshold,
           "metrics": metrics, "coverage": float(definite.mean()),
           "by_class": calls_by_class(np.asarray(classes), p, band.threshold, band.lower, band.upper)}
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

    from pipeline.metrics import reliability_curve

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


def _flat_metrics(result: dict, prefix: str) -> dict[str, float]:
    flat = {}
    for name, m in result["metrics"].items():
        flat[f"{prefix}{name}"] = m["value"]
        flat[f"{prefix}{name}_ci_low"] = m["ci_low"]
        flat[f"{prefix}{name}_ci_high"] = m["ci_high"]
    flat[f"{prefix}coverage"] = result["coverage"]
    if "normal_columnar_fpr" in result:
        flat[f"{prefix}normal_columnar_fpr"] = result["normal_columnar_fpr"]
    return flat


def _summary_line(name: str, result: dict) -> str:
    m = result["metrics"]
    parts = [f"{k} {m[k]['value']:.3f} [{m[k]['ci_low']:.3f}, {m[k]['ci_high']:.3f}]"
             for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")]
    return f"{name}: n={result['n']}  " + "  ".join(parts) + f"  coverage {result['coverage']:.3f}"


@dataclass
class HeldOut:
    """Predictions of models that did not train on these cells: what calibration is fitted on."""

    source: str  # "out-of-fold" | "validation"
    logits: dict  # {tta: bool -> (N, C) logits}
    label_idx: np.ndarray
    y_pos: np.ndarray
    groups: list[str]
    classes: list[str]  # original classes (per-class error rates)
    ood_scores: np.ndarray | None  # out-of-fold only: each fold's own guard on its held-out cells


def read_oof(oof_csv: Path, labels: list[str], positive_labels: list[str]) -> HeldOut:
    """The cv stage's oof.csv as calibration evidence for a model with these labels."""
    import pandas as pd

    from pipeline.cv import logit_columns

    try:
        oof = pd.read_csv(oof_csv, dtype={"group": str})
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{oof_csv}: cannot read out-of-fold predictions ({exc})") from None
    needed = ["label", "group", "original_class", "ood_score", *logit_columns(labels), *logit_columns(labels, "tta_logit_")]
    missing = [c for c in needed if c not in oof.columns]
    if missing or oof.empty:
        raise EvaluationError(f"{oof_csv}: not out-of-fold predictions for labels {labels} "
                              f"(missing {', '.join(missing) or 'rows'}); rerun the cv stage")
    unknown = sorted(set(oof["label"]) - set(labels))
    if unknown:
        raise EvaluationError(f"{oof_csv}: labels {unknown} are not the model's {labels}; rerun the cv stage")
    return HeldOut("out-of-fold",
                   {False: oof[logit_columns(labels)].to_numpy(float),
                    True: oof[logit_columns(labels, "tta_logit_")].to_numpy(float)},
                   np.array([labels.index(x) for x in oof["label"]]),
                   positive_targets(list(oof["label"]), positive_labels), list(oof["group"]),
                   list(oof["original_class"]), oof["ood_score"].to_numpy(float))


def evaluate_split(params: Params, model_dir: Path, split_csv: Path, out_model_dir: Path, reports_dir: Path,
                   log=print, oof_csv: Path | None = None) -> dict:
    """The stage body (no MLflow): calibrate on held-out predictions (out-of-fold when `oof_csv` is
    given, else val), measure test with and without TTA, write files."""
    from pipeline.inference.predictor import META_FILE, WEIGHTS_FILE, TorchPredictor, file_sha256, read_metadata

    cfg = params.evaluate
    predictor = TorchPredictor(model_dir)
    unknown = [x for x in cfg.positive_labels if x not in predictor.labels]
    if unknown:
        raise EvaluationError(f"evaluate.positive_labels {unknown} are not labels of the model {predictor.labels}")
    fit_on = predictor.meta.get("fit_on", "train")
    if fit_on == "train+val" and oof_csv is None:
        raise EvaluationError(f"{model_dir}: the model trained on train+val, so no split is held out to calibrate "
                              "on; pass the cv stage's out-of-fold predictions (--oof reports/cv/oof.csv)")
    split = read_table(split_csv, SPLIT_COLUMNS)
    root = params.data.root
    parts = {}
    # train (+ val when it trained on it): the OOD guard is fitted on the features of what the model saw
    guard_splits = ["train", "val"] if fit_on == "train+val" else ["train"]
    needed = (guard_splits + ["test"]) if oof_csv is not None else ["train", "val", "test"]
    for name in needed:
        rows = split[split["split"] == name]
        images, errors = load_images([root / p for p in rows["path"]])
        bad = [e for e in errors if e]
        if bad:
            raise EvaluationError(f"{len(bad)} {name} image(s) unreadable since ingest, e.g. {bad[0]}; rerun `dvc repro`")
        parts[name] = (rows, images)

    # Both variants are always measured; cfg.tta picks the one that ships.
    results, calibrations, variants = {}, {}, [True, False]
    test_rows, test_images = parts["test"]
    y_test = positive_targets(list(test_rows["label"]), cfg.positive_labels)
    outputs = {}
    if oof_csv is not None:
        held = read_oof(Path(oof_csv), predictor.labels, cfg.positive_labels)
    else:
        val_rows, val_images = parts["val"]
        log("evaluate: scoring val (single view and 8-view TTA)")
        outputs["val"] = {tta: predictor.predict_outputs(val_images, tta) for tta in variants}
        held = HeldOut("validation", {tta: outputs["val"][tta][0] for tta in variants},
                       np.array([predictor.labels.index(x) for x in val_rows["label"]]),
                       positive_targets(list(val_rows["label"]), cfg.positive_labels), list(val_rows["group"]),
                       list(val_rows["original_class"]), None)
    log(f"evaluate: calibrating on {len(held.y_pos)} {held.source} predictions")
    for tta in variants:
        key = "tta" if tta else "no_tta"
        log(f"evaluate: scoring test ({'8-view TTA' if tta else 'single view'})")
        outputs[key] = {"test": predictor.predict_outputs(test_images, tta)}
        calibrations[key] = calibrate(held.logits[tta], held.label_idx, held.y_pos, predictor, cfg, tta)
        calibrations[key]["validation"]["source"] = held.source
        predictor.meta["calibration"] = calibrations[key]
        p_test = predictor.malignant_probability(predictor.probabilities(outputs[key]["test"][0]))
        results[key] = measure(y_test, p_test, list(test_rows["group"]), list(test_rows["original_class"]),
                               calibrations[key], cfg, seed=params.split.seed)
        results[key]["p"] = p_test
    shipped = "tta" if cfg.tta else "no_tta"
    calibration, result = calibrations[shipped], results[shipped]
    from pipeline.calibration import softmax

    # the held-out evidence at the shipped operating point: what promotion and the model card read
    p_held = softmax(held.logits[cfg.tta], calibration["temperature"])[:, [predictor.labels.index(x)
                                                                           for x in cfg.positive_labels]].sum(1)
    heldout = measure(held.y_pos, p_held, held.groups, held.classes, calibration, cfg, seed=params.split.seed)
    heldout["source"] = held.source

    # ---- OOD guard, on the features of the shipped variant: fitted on the cells the model trained
    # on, thresholded on held-out scores (each fold's own guard on its held-out cells, or val)
    from pipeline import ood

    seen_rows = [parts[name][0] for name in guard_splits]
    seen_images = [im for name in guard_splits for im in parts[name][1]]
    n_seen = sum(len(r) for r in seen_rows)
    log(f"evaluate: fitting the {params.ood.method} OOD guard on the {n_seen} {'+'.join(guard_splits)} cells")
    seen_idx = np.array([predictor.labels.index(x) for r in seen_rows for x in r["label"]])
    held_scores = held.ood_scores if held.ood_scores is not None else outputs["val"][cfg.tta]
    guard = fit_guard(predictor.predict_outputs(seen_images, cfg.tta), seen_idx, held_scores, params.ood, log)
    test_ood = ood.score(guard, outputs[shipped]["test"][1], outputs[shipped]["test"][0]) if guard else \
        np.full(len(test_rows), np.nan)
    test_in = ood.in_domain(guard, test_ood)

    # ---- calibrated model folder: same weights, metadata + calibration
    out_model_dir = Path(out_model_dir)
    out_model_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out_model_dir / WEIGHTS_FILE) as tmp:
        shutil.copyfile(Path(model_dir) / WEIGHTS_FILE, tmp)
    meta = read_metadata(model_dir)
    meta["calibration"] = calibration
    meta["test_metrics"] = {k: v["value"] for k, v in result["metrics"].items()}
    meta.pop("ood", None)
    (meta.get("sha256") or {}).pop(ood.OOD_FILE, None)
    if guard is not None:  # the guard travels with the weights, checked like them on every load
        ood.save(out_model_dir / ood.OOD_FILE, guard)
        meta.setdefault("sha256", {})[ood.OOD_FILE] = file_sha256(out_model_dir / ood.OOD_FILE)
        meta["ood"] = {"file": ood.OOD_FILE, **ood.summary(guard), "test_pass_rate": float(test_in.mean())}
    else:
        (out_model_dir / ood.OOD_FILE).unlink(missing_ok=True)
    atomic.write_json(out_model_dir / META_FILE, meta)

    # ---- reports
    from pipeline.calibration import Band

    reports_dir = Path(reports_dir)
    band = Band(calibration["threshold"], calibration["band_width"])
    plots = write_plots(reports_dir, y_test, result["p"], band.call(result["p"]), cfg.ece_bins)
    metrics = {"test": _flat_metrics(result, ""), "calibration": {k: v for k, v in calibration.items()
                                                                   if k != "validation"} | calibration["validation"]}
    metrics["test_with_tta"] = _flat_metrics(results["tta"], "")
    metrics["test_without_tta"] = _flat_metrics(results["no_tta"], "")
    metrics["test"]["n"] = result["n"]
    metrics["test"]["n_groups"] = result["n_groups"]
    metrics["heldout"] = {**_flat_metrics(heldout, ""), "n": heldout["n"], "n_groups": heldout["n_groups"],
                          "source": held.source}
    if guard is not None:
        metrics["ood"] = {**ood.summary(guard), "test_pass_rate": float(test_in.mean())}
    atomic.write_json(reports_dir / "metrics.json", metrics)
    atomic.write_json(reports_dir / "by_class.json", result["by_class"])
    atomic.write_json(reports_dir / "heldout_by_class.json", heldout["by_class"])
    import pandas as pd

    atomic.write_csv(reports_dir / "test_predictions.csv", pd.DataFrame({
        "path": test_rows["path"].to_numpy(), "group": test_rows["group"].to_numpy(),
        "original_class": test_rows["original_class"].to_numpy(), "label": test_rows["label"].to_numpy(),
        "p_malignant": result["p"], "call": band.call(result["p"]), "ood_score": test_ood, "in_domain": test_in}))
    log(_summary_line(f"held-out ({held.source})", heldout))
    for key in results:
        log(_summary_line(f"test ({key.replace('_', ' ')})", results[key]))
    log(f"calibration: temperature {calibration['temperature']:.3f}, threshold {calibration['threshold']:.4f} "
        f"({calibration['threshold_rule']}), band [{band.lower:.4f}, {band.upper:.4f}], "
        f"{held.source} sensitivity {calibration['validation']['sensitivity']:.3f} on {len(held.y_pos)} cells")
    if guard is not None:
        log(f"ood: {params.ood.method} threshold {float(guard['threshold']):.4g}, {held.source} pass rate "
            f"{float(guard['val_pass_rate']):.3f}, test pass rate {test_in.mean():.3f}")
    return {"metrics": metrics, "result": result, "heldout": heldout, "calibration": calibration, "plots": plots,
            "ood": meta.get("ood"),
            "files": [reports_dir / "metrics.json", reports_dir / "by_class.json", reports_dir / "heldout_by_class.json",
                      reports_dir / "test_predictions.csv"]}


def promotion_decision(test_metrics: dict, params: Params, heldout: dict | None = None) -> tuple[bool, str]:
    """(promote?, reason): pipeline/promotion.py's rule on the held-out result (`measure()` of the
    out-of-fold predictions) and the test AUC and sensitivity."""
    from pipeline.promotion import Evidence, decide

    auc = (heldout or {}).get("metrics", {}).get("roc_auc", {})
    evidence = Evidence(auc.get("value"), auc.get("ci_low"), (heldout or {}).get("source", "out-of-fold"),
                        test_metrics["roc_auc"], test_metrics["sensitivity"])
    return decide(evidence, params.promotion)


def training_data(params: Params, split_csv: Path, fit_on: str) -> dict:
    """What the model trained on, for its card: sources, label map, cells per class, groups."""
    split = read_table(split_csv, SPLIT_COLUMNS)
    rows = split[split["split"].isin(["train", "val"] if fit_on == "train+val" else ["train"])]
    return {"sources": [f"{s.name} ({s.path})" for s in params.data.source_list()],
            "label_map": params.data.label_map, "fit_on": fit_on, "n": int(len(rows)),
            "groups": int(rows["group"].nunique()),
            "counts": {str(k): int(v) for k, v in rows.groupby("original_class").size().items()}}


def write_card(params: Params, model_dir: Path, reports_dir: Path, split_csv: Path, promoted: bool, reason: str,
               cv_metrics_json: Path | None) -> None:
    """model_card.md (and its key facts in model.json) from the metrics files just written."""
    import json

    from pipeline import model_card
    from pipeline.inference.predictor import META_FILE, read_metadata

    read = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    metrics = read(reports_dir / "metrics.json")
    cv_metrics = read(cv_metrics_json) if cv_metrics_json and Path(cv_metrics_json).is_file() else None
    meta = read_metadata(model_dir)
    meta["card"] = model_card.card_facts(metrics, promoted, reason)
    text = model_card.render(meta, metrics, cv_metrics, read(reports_dir / "by_class.json"),
                             read(reports_dir / "heldout_by_class.json"),
                             training_data(params, split_csv, meta.get("fit_on", "train")), promoted, reason,
                             params.mlflow.registered_model)
    atomic.write_text(model_dir / model_card.CARD_FILE, text)
    atomic.write_json(model_dir / META_FILE, meta)


def run(params: Params, model_dir: Path, split_csv: Path, out_model_dir: Path, reports_dir: Path,
        oof_csv: Path | None = None) -> dict:
    """The stage: evaluate, then log to the training run, register the calibrated model, promote."""
    from pipeline import tracking
    from pipeline.inference.mlflow_pyfunc import input_example
    from pipeline.inference.predictor import META_FILE, read_metadata

    out = evaluate_split(params, model_dir, split_csv, out_model_dir, reports_dir, oof_csv=oof_csv)
    test_values = {k: v["value"] for k, v in out["result"]["metrics"].items()}
    promote, reason = promotion_decision(test_values, params, out["heldout"])
    write_card(params, Path(out_model_dir), Path(reports_dir), Path(split_csv), promote, reason,
               Path(oof_csv).parent / "metrics.json" if oof_csv else None)
    example = input_example(params.data.root, split_csv)
    train_run = (read_metadata(model_dir).get("mlflow") or {}).get("run_id")
    logged = tracking.log_evaluation(
        params.mlflow, train_run, Path(out_model_dir), example,
        metrics={**{f"test_{k}": v for k, v in out["metrics"]["test"].items()},
                 **{f"heldout_{k}": v for k, v in out["metrics"]["heldout"].items()}},
        artifacts=out["plots"] + out["files"], calibration=out["calibration"],
        promote=promote, reason=reason, champion_alias=params.promotion.alias, ood=out["ood"])
    meta = read_metadata(out_model_dir)
    meta["mlflow"] = {**logged, "registered_model": params.mlflow.registered_model}
    atomic.write_json(Path(out_model_dir) / META_FILE, meta)
    print(f"{reason}; {params.mlflow.registered_model} v{logged['version']} "
          f"@{params.promotion.alias if promote else params.mlflow.alias}")
    return {**out, "promoted": promote, "reason": reason, "mlflow": logged}


# ---------------------------------------------------------------- any labelled folder

def evaluate_folder(model: str, data_dir: Path, label_map_path: Path, out_dir: Path, cfg: EvaluateConfig,
                    group_regex: str | None = None, tta: bool | None = None, tracking_uri: str | None = None) -> dict:
    """Measure a model on a folder of class subfolders, with the model's own calibration.

    Unreadable files are reported and skipped; classes mapped to `exclude` are scored and
    reported per class but left out of the binary metrics. Without a group regex every image
    is its own group for the bootstrap.
    """
    import re

    import pandas as pd

    from pipeline.calibration import Band
    from pipeline.config import ConfigError, GroupRule
    from pipeline.data.ingest import discover
    from pipeline.inference.loading import resolve_model_dir
    from pipeline.inference.predictor import open_predictor
    from pipeline.metrics import calls_by_class

    # ONNX Runtime for an exported model, eager torch otherwise.
    predictor = open_predictor(resolve_model_dir(model, tracking_uri))
    calibration = predictor.calibration
    if not calibration:
        print(f"warning: {model} has no calibration (run the evaluate stage); using temperature 1 and "
              "threshold 0.5", file=sys.stderr)
        calibration = {"threshold": 0.5, "band_width": 0.0, "temperature": 1.0}
    label_map = LabelMap.load(label_map_path)
    rejects: list[dict] = []
    candidates = discover(Path(data_dir), GroupRule(), rejects)
    missing = sorted({c.original_class for c in candidates} - set(label_map.classes))
    if missing:
        raise ConfigError(label_map.missing_message(missing))
    images, errors = load_images([c.path for c in candidates])
    ok = [i for i, e in enumerate(errors) if e is None]
    for i, e in enumerate(errors):
        if e:
            rejects.append({"path": candidates[i].rel, "original_class": candidates[i].original_class,
                            "reason": e.split(": ", 1)[-1]})
    for r in rejects:
        print(f"skipped: {r['path']}: {r['reason']}", file=sys.stderr)
    if not ok:
        raise EvaluationError(f"{data_dir}: no readable images ({len(rejects)} skipped)")

    from pipeline import ood

    probs, ood_score, in_domain = predictor.predict_scores([images[i] for i in ok], tta=tta)
    p = predictor.malignant_probability(probs)
    band = Band(calibration["threshold"], calibration["band_width"])
    cases = [candidates[i] for i in ok]
    labels = [label_map.classes[c.original_class] for c in cases]
    pattern = re.compile(group_regex) if group_regex else None

    def group_of(c):
        m = pattern.search(c.path.name) if pattern else None
        return m.group(1) if m else c.rel

    frame = pd.DataFrame({"path": [c.rel for c in cases], "original_class": [c.original_class for c in cases],
                          "label": labels, "group": [group_of(c) for c in cases], "p_malignant": p,
                          "call": ood.guard_calls(band.call(p), in_domain), "ood_score": ood_score,
                          "in_domain": in_domain})
    out_dir = Path(out_dir)
    atomic.write_csv(out_dir / "predictions.csv", frame)
    atomic.write_csv(out_dir / "rejects.csv", pd.DataFrame(rejects, columns=["path", "original_class", "reason"]))
    included = frame["label"] != EXCLUDE
    report: dict = {"model": model, "data": str(data_dir), "n_scored": int(len(frame)), "n_skipped": len(rejects),
                    "n_excluded": int((~included).sum()), "calibration": {k: calibration.get(k) for k in
                                                                         ("temperature", "threshold", "band_width", "tta")},
                    "by_class": calls_by_class(frame["original_class"].to_numpy(), p, band.threshold, band.lower, band.upper),
                    # Metrics below use every cell's P(malignant); out-of-domain cells are counted here.
                    "n_out_of_domain": int((~in_domain).sum()), "fraction_out_of_domain": float((~in_domain).mean()),
                    "ood_method": ood.method_of(predictor.ood) if predictor.ood is not None else None}
    inc = frame[included]
    y = positive_targets(list(inc["label"]), predictor.positive_labels)
    if len(set(y.tolist())) == 2:
        result = measure(y, inc["p_malignant"].to_numpy(), list(inc["group"]), list(inc["original_class"]),
                         calibration, cfg)
        report["metrics"] = result["metrics"]
        report["coverage"] = result["coverage"]
        write_plots(out_dir, y, inc["p_malignant"].to_numpy(), inc["call"].to_numpy(), cfg.ece_bins)
        print(_summary_line("evaluate", result))
    else:
        report["metrics"] = None
        print("evaluate: the included cases hold one class only; binary metrics are not defined", file=sys.stderr)
    atomic.write_json(out_dir / "metrics.json", report)
    print(f"evaluate: {len(frame)} scored, {len(rejects)} skipped, {report['n_excluded']} excluded from metrics "
          f"-> {out_dir}")
    return report
