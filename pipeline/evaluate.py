"""Evaluate stage: calibrate on held-out predictions, measure on test with group-bootstrap CIs, promote.

- Temperature, threshold, indeterminate band and the OOD threshold are fitted only on predictions
  of models that did not train on those cells: the cv stage's out-of-fold predictions (`oof_csv`,
  ~613 cells, the same recipe as the shipped model), or, without them, the validation split
  (only for a model that did not train on it).
- Every metric on test gets a 95% CI from a bootstrap that resamples groups, not cells.
- The calibrated model folder (weights + model.json with a `calibration` block) is what every
  later command loads; it is also registered in MLflow.
Measuring any labelled folder with an existing model is pipeline/evaluate_folder.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, card_markdown, ood, tracking
from pipeline.calibration import Band, choose_threshold, fit_temperature, malignant_probability, nll, softmax
from pipeline.config import EvaluateConfig, OodConfig, Params
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.inference.predictor import TorchPredictor
from pipeline.measurement import (
    EvaluationError,
    flat_metrics,
    load_images,
    logit_columns,
    measure,
    positive_targets,
    summary_line,
    write_plots,
)
from pipeline.metrics import expected_calibration_error
from pipeline.morphometry import model_files
from pipeline.model_card import WEIGHTS_FILE, Calibration, ModelCard, OodGuard, file_sha256
from pipeline.promotion import Evidence, decide
from pipeline.tracking import input_example


def calibrate(
    logits: np.ndarray, label_idx: np.ndarray, y_pos: np.ndarray, predictor, cfg: EvaluateConfig, tta: bool
) -> dict:
    """Temperature + threshold + band from validation logits; returns the model's `calibration` block."""

    temperature = fit_temperature(logits, label_idx)
    idx = [predictor.labels.index(x) for x in cfg.positive_labels]
    p_raw = softmax(logits)[:, idx].sum(1)
    p_cal = softmax(logits, temperature)[:, idx].sum(1)
    chosen = choose_threshold(y_pos, p_cal, cfg.threshold_rule, cfg.target_sensitivity)
    band = Band(chosen["threshold"], cfg.band_width)
    return {
        "temperature": float(temperature),
        "tta": bool(tta),
        "positive_labels": list(cfg.positive_labels),
        "threshold": float(band.threshold),
        "threshold_rule": cfg.threshold_rule,
        "target_sensitivity": cfg.target_sensitivity if cfg.threshold_rule == "sensitivity" else None,
        "band_width": cfg.band_width,
        "band": [band.lower, band.upper],
        "validation": {
            "n": int(len(y_pos)),
            "sensitivity": chosen["sensitivity"],
            "specificity": chosen["specificity"],
            "nll_before": nll(logits, label_idx),
            "nll_after": nll(logits, label_idx, temperature),
            "ece_before": expected_calibration_error(y_pos, p_raw, cfg.ece_bins),
            "ece_after": expected_calibration_error(y_pos, p_cal, cfg.ece_bins),
            "coverage": band.coverage(p_cal),
        },
    }


def fit_guard(
    train: tuple[np.ndarray, np.ndarray | None], train_idx: np.ndarray, held_out, cfg: OodConfig, log=print
) -> dict | None:
    """The OOD guard: fitted on the training cells' (logits, features), thresholded on held-out
    cells: their (logits, features) under this guard, or scores already computed out of fold.
    None when the backbone gives no pooled features and the method needs them."""
    if cfg.method != "energy" and train[1] is None:
        log(f"warning: the model gives no pooled features; no {cfg.method} OOD guard is fitted")
        return None
    params = ood.fit_configured(train[1], train_idx, cfg)
    scores = held_out if isinstance(held_out, np.ndarray) else ood.score(params, held_out[1], held_out[0])
    return ood.set_threshold(params, scores, cfg.pass_rate)


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

    try:
        oof = pd.read_csv(oof_csv, dtype={"group": str})
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{oof_csv}: cannot read out-of-fold predictions ({exc})") from None
    needed = [
        "label",
        "group",
        "original_class",
        "ood_score",
        *logit_columns(labels),
        *logit_columns(labels, "tta_logit_"),
    ]
    missing = [c for c in needed if c not in oof.columns]
    if missing or oof.empty:
        raise EvaluationError(
            f"{oof_csv}: not out-of-fold predictions for labels {labels} "
            f"(missing {', '.join(missing) or 'rows'}); rerun the cv stage"
        )
    unknown = sorted(set(oof["label"]) - set(labels))
    if unknown:
        raise EvaluationError(f"{oof_csv}: labels {unknown} are not the model's {labels}; rerun the cv stage")
    return HeldOut(
        "out-of-fold",
        {
            False: oof[logit_columns(labels)].to_numpy(float),
            True: oof[logit_columns(labels, "tta_logit_")].to_numpy(float),
        },
        np.array([labels.index(x) for x in oof["label"]]),
        positive_targets(list(oof["label"]), positive_labels),
        list(oof["group"]),
        list(oof["original_class"]),
        oof["ood_score"].to_numpy(float),
    )


def _read_parts(params: Params, split_csv: Path, names: list[str]) -> dict[str, tuple]:
    """{split name: (its rows, its images)}; an image unreadable since ingest stops the stage."""
    split = read_table(split_csv, SPLIT_COLUMNS)
    parts = {}
    for name in names:
        rows = split[split["split"] == name]
        images, errors = load_images([params.data.root / p for p in rows["path"]])
        bad = [e for e in errors if e]
        if bad:
            raise EvaluationError(
                f"{len(bad)} {name} image(s) unreadable since ingest, e.g. {bad[0]}; rerun `dvc repro`"
            )
        parts[name] = (rows, images)
    return parts


def _held_out_evidence(
    predictor, parts: dict, oof_csv: Path | None, cfg: EvaluateConfig, outputs: dict, log
) -> HeldOut:
    """The out-of-fold predictions, or the model's own (single view and TTA) on val."""
    if oof_csv is not None:
        return read_oof(Path(oof_csv), predictor.labels, cfg.positive_labels)
    val_rows, val_images = parts["val"]
    log("evaluate: scoring val (single view and 8-view TTA)")
    outputs["val"] = {tta: predictor.image_outputs(val_images, tta) for tta in (True, False)}
    return HeldOut(
        "validation",
        {tta: outputs["val"][tta][0] for tta in (True, False)},
        np.array([predictor.labels.index(x) for x in val_rows["label"]]),
        positive_targets(list(val_rows["label"]), cfg.positive_labels),
        list(val_rows["group"]),
        list(val_rows["original_class"]),
        None,
    )


def _calibrate_and_measure(
    predictor, held: HeldOut, test: tuple, params: Params, outputs: dict, log
) -> tuple[dict, dict]:
    """({variant: calibration}, {variant: test result}) for TTA and single view: both are always
    measured; evaluate.tta picks the one that ships."""
    cfg = params.evaluate
    test_rows, test_images = test
    y_test = positive_targets(list(test_rows["label"]), cfg.positive_labels)
    calibrations, results = {}, {}
    for tta in (True, False):
        key = "tta" if tta else "no_tta"
        log(f"evaluate: scoring test ({'8-view TTA' if tta else 'single view'})")
        outputs[key] = {"test": predictor.image_outputs(test_images, tta)}
        calibrations[key] = calibrate(held.logits[tta], held.label_idx, held.y_pos, predictor, cfg, tta)
        calibrations[key]["validation"]["source"] = held.source
        p_test = malignant_probability(
            outputs[key]["test"][0], predictor.labels, cfg.positive_labels, calibrations[key]["temperature"]
        )
        results[key] = measure(
            y_test,
            p_test,
            list(test_rows["group"]),
            list(test_rows["original_class"]),
            calibrations[key],
            cfg,
            seed=params.split.seed,
        )
        results[key]["p"] = p_test
        results[key]["y"] = y_test
    return calibrations, results


def _fit_shipped_guard(
    predictor, parts: dict, guard_splits: list[str], held: HeldOut, outputs: dict, params: Params, log
):
    """(guard or None, test OOD scores, test in-domain mask). The guard is fitted on the features of
    the shipped variant of the cells the model trained on, and thresholded on held-out scores
    (each fold's own guard on its held-out cells, or val)."""
    cfg, shipped = params.evaluate, "tta" if params.evaluate.tta else "no_tta"
    seen_rows = [parts[name][0] for name in guard_splits]
    seen_images = [im for name in guard_splits for im in parts[name][1]]
    log(
        f"evaluate: fitting the {params.ood.method} OOD guard on the {sum(len(r) for r in seen_rows)} "
        f"{'+'.join(guard_splits)} cells"
    )
    seen_idx = np.array([predictor.labels.index(x) for r in seen_rows for x in r["label"]])
    held_scores = held.ood_scores if held.ood_scores is not None else outputs["val"][cfg.tta]
    guard = fit_guard(predictor.image_outputs(seen_images, cfg.tta), seen_idx, held_scores, params.ood, log)
    logits, features = outputs[shipped]["test"]
    test_ood = ood.score(guard, features, logits) if guard else np.full(len(logits), np.nan)
    return guard, test_ood, ood.in_domain(guard, test_ood)


def write_calibrated_model(
    predictor,
    model_dir: Path,
    out_model_dir: Path,
    calibration: dict,
    result: dict,
    guard: dict | None,
    test_in: np.ndarray,
) -> ModelCard:
    """The calibrated model folder: the same weights, and a card with the calibration and the guard."""
    out_model_dir = Path(out_model_dir)
    out_model_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out_model_dir / WEIGHTS_FILE) as tmp:
        shutil.copyfile(Path(model_dir) / WEIGHTS_FILE, tmp)
    card = dataclasses.replace(
        predictor.card,
        calibration=Calibration.from_dict(calibration),
        ood=None,
        test_metrics={k: v["value"] for k, v in result["metrics"].items()},
    )
    card = card.with_file(ood.OOD_FILE, None)
    if guard is not None:  # the guard travels with the weights, checked like them on every load
        ood.save(out_model_dir / ood.OOD_FILE, guard)
        card = dataclasses.replace(
            card.with_file(ood.OOD_FILE, file_sha256(out_model_dir / ood.OOD_FILE)),
            ood=OodGuard.from_summary(ood.summary(guard), test_pass_rate=float(test_in.mean())),
        )
    else:
        (out_model_dir / ood.OOD_FILE).unlink(missing_ok=True)
    card.write(out_model_dir)
    return card


def write_reports(
    reports_dir: Path,
    test_rows,
    results: dict,
    shipped: str,
    calibration: dict,
    heldout: dict,
    guard: dict | None,
    test_ood: np.ndarray,
    test_in: np.ndarray,
    cfg: EvaluateConfig,
):
    """metrics.json, the per-class tables, test_predictions.csv and the plot files; returns
    (metrics, plot files, other files)."""
    import pandas as pd

    reports_dir, result = Path(reports_dir), results[shipped]
    band = Band(calibration["threshold"], calibration["band_width"])
    plots = write_plots(reports_dir, result["y"], result["p"], band.call(result["p"]), cfg.ece_bins)
    metrics = {
        "test": {**flat_metrics(result, ""), "n": result["n"], "n_groups": result["n_groups"]},
        "calibration": {k: v for k, v in calibration.items() if k != "validation"} | calibration["validation"],
        "test_with_tta": flat_metrics(results["tta"], ""),
        "test_without_tta": flat_metrics(results["no_tta"], ""),
        "heldout": {
            **flat_metrics(heldout, ""),
            "n": heldout["n"],
            "n_groups": heldout["n_groups"],
            "source": heldout["source"],
        },
    }
    if guard is not None:
        metrics["ood"] = {**ood.summary(guard), "test_pass_rate": float(test_in.mean())}
    files = [
        reports_dir / name
        for name in ("metrics.json", "by_class.json", "heldout_by_class.json", "test_predictions.csv")
    ]
    atomic.write_json(files[0], metrics)
    atomic.write_json(files[1], result["by_class"])
    atomic.write_json(files[2], heldout["by_class"])
    atomic.write_csv(
        files[3],
        pd.DataFrame(
            {
                "path": test_rows["path"].to_numpy(),
                "group": test_rows["group"].to_numpy(),
                "original_class": test_rows["original_class"].to_numpy(),
                "label": test_rows["label"].to_numpy(),
                "p_malignant": result["p"],
                "call": band.call(result["p"]),
                "ood_score": test_ood,
                "in_domain": test_in,
            }
        ),
    )
    return metrics, plots, files


def evaluate_split(
    params: Params,
    model_dir: Path,
    split_csv: Path,
    out_model_dir: Path,
    reports_dir: Path,
    log=print,
    oof_csv: Path | None = None,
) -> dict:
    """The stage body (no MLflow): calibrate on held-out predictions (out-of-fold when `oof_csv` is
    given, else val), measure test with and without TTA, write files."""
    cfg = params.evaluate
    predictor = TorchPredictor(model_dir)
    unknown = [x for x in cfg.positive_labels if x not in predictor.labels]
    if unknown:
        raise EvaluationError(f"evaluate.positive_labels {unknown} are not labels of the model {predictor.labels}")
    fit_on = predictor.card.fit_on
    if fit_on == "train+val" and oof_csv is None:
        raise EvaluationError(
            f"{model_dir}: the model trained on train+val, so no split is held out to calibrate "
            "on; pass the cv stage's out-of-fold predictions (--oof reports/cv/oof.csv)"
        )
    # train (+ val when it trained on it): the OOD guard is fitted on the features of what the model saw
    guard_splits = ["train", "val"] if fit_on == "train+val" else ["train"]
    parts = _read_parts(
        params, split_csv, (guard_splits + ["test"]) if oof_csv is not None else ["train", "val", "test"]
    )
    outputs: dict = {}
    held = _held_out_evidence(predictor, parts, oof_csv, cfg, outputs, log)
    log(f"evaluate: calibrating on {len(held.y_pos)} {held.source} predictions")
    calibrations, results = _calibrate_and_measure(predictor, held, parts["test"], params, outputs, log)
    shipped = "tta" if cfg.tta else "no_tta"
    calibration, result = calibrations[shipped], results[shipped]
    # the held-out evidence at the shipped operating point: what promotion and the model card read
    p_held = malignant_probability(
        held.logits[cfg.tta], predictor.labels, cfg.positive_labels, calibration["temperature"]
    )
    heldout = measure(held.y_pos, p_held, held.groups, held.classes, calibration, cfg, seed=params.split.seed)
    heldout["source"] = held.source
    guard, test_ood, test_in = _fit_shipped_guard(predictor, parts, guard_splits, held, outputs, params, log)
    card = write_calibrated_model(predictor, model_dir, out_model_dir, calibration, result, guard, test_in)
    metrics, plots, files = write_reports(
        reports_dir, parts["test"][0], results, shipped, calibration, heldout, guard, test_ood, test_in, cfg
    )
    _log_summary(log, held, heldout, results, calibration, guard, test_in, params.ood.method)
    return {
        "metrics": metrics,
        "result": result,
        "heldout": heldout,
        "calibration": calibration,
        "plots": plots,
        "ood": card.ood.to_dict() if card.ood else None,
        "files": files,
    }


def _log_summary(
    log,
    held: HeldOut,
    heldout: dict,
    results: dict,
    calibration: dict,
    guard: dict | None,
    test_in: np.ndarray,
    method: str,
) -> None:
    band = Band(calibration["threshold"], calibration["band_width"])
    log(summary_line(f"held-out ({held.source})", heldout))
    for key in results:
        log(summary_line(f"test ({key.replace('_', ' ')})", results[key]))
    log(
        f"calibration: temperature {calibration['temperature']:.3f}, threshold {calibration['threshold']:.4f} "
        f"({calibration['threshold_rule']}), band [{band.lower:.4f}, {band.upper:.4f}], "
        f"{held.source} sensitivity {calibration['validation']['sensitivity']:.3f} on {len(held.y_pos)} cells"
    )
    if guard is not None:
        log(
            f"ood: {method} threshold {float(guard['threshold']):.4g}, {held.source} pass rate "
            f"{float(guard['val_pass_rate']):.3f}, test pass rate {test_in.mean():.3f}"
        )


def promotion_decision(test_metrics: dict, params: Params, heldout: dict | None = None) -> tuple[bool, str]:
    """(promote?, reason): pipeline/promotion.py's rule on the held-out result (`measure()` of the
    out-of-fold predictions) and the test AUC and sensitivity."""

    auc = (heldout or {}).get("metrics", {}).get("roc_auc", {})
    evidence = Evidence(
        auc.get("value"),
        auc.get("ci_low"),
        (heldout or {}).get("source", "out-of-fold"),
        test_metrics["roc_auc"],
        test_metrics["sensitivity"],
    )
    return decide(evidence, params.promotion)


def training_data(params: Params, split_csv: Path, fit_on: str) -> dict:
    """What the model trained on, for its card: sources, label map, cells per class, groups."""
    split = read_table(split_csv, SPLIT_COLUMNS)
    rows = split[split["split"].isin(["train", "val"] if fit_on == "train+val" else ["train"])]
    return {
        "sources": [f"{s.name} ({s.path})" for s in params.data.source_list()],
        "label_map": params.data.label_map,
        "fit_on": fit_on,
        "n": int(len(rows)),
        "groups": int(rows["group"].nunique()),
        "counts": {str(k): int(v) for k, v in rows.groupby("original_class").size().items()},
    }


def write_card(
    params: Params,
    model_dir: Path,
    reports_dir: Path,
    split_csv: Path,
    promoted: bool,
    reason: str,
    cv_metrics_json: Path | None,
) -> None:
    """model_card.md (and its key facts in model.json) from the metrics files just written."""
    read = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    metrics = read(reports_dir / "metrics.json")
    cv_metrics = read(cv_metrics_json) if cv_metrics_json and Path(cv_metrics_json).is_file() else None
    card = ModelCard.read(model_dir)
    card = dataclasses.replace(card, card=card_markdown.card_facts(metrics, promoted, reason))
    text = card_markdown.render(
        card,
        metrics,
        cv_metrics,
        read(reports_dir / "by_class.json"),
        read(reports_dir / "heldout_by_class.json"),
        training_data(params, split_csv, card.fit_on),
        promoted,
        reason,
        params.mlflow.registered_model,
    )
    atomic.write_text(model_dir / card_markdown.CARD_FILE, text)
    card.write(model_dir)


def run(
    params: Params,
    model_dir: Path,
    split_csv: Path,
    out_model_dir: Path,
    reports_dir: Path,
    oof_csv: Path | None = None,
    atypia_json: Path | None = None,
    atypia_metrics: Path | None = None,
) -> dict:
    """The stage: evaluate, then log to the training run, register the calibrated model, promote.
    `atypia_json` (the morphometry stage's fitted atypia model) travels into the calibrated model."""

    out = evaluate_split(params, model_dir, split_csv, out_model_dir, reports_dir, oof_csv=oof_csv)
    test_values = {k: v["value"] for k, v in out["result"]["metrics"].items()}
    promote, reason = promotion_decision(test_values, params, out["heldout"])
    if atypia_json is not None:
        model_files.attach(Path(out_model_dir), Path(atypia_json), atypia_metrics, params.morphometry)
    write_card(
        params,
        Path(out_model_dir),
        Path(reports_dir),
        Path(split_csv),
        promote,
        reason,
        Path(oof_csv).parent / "metrics.json" if oof_csv else None,
    )
    example = input_example(params.data.root, split_csv)
    train_run = (ModelCard.read(model_dir).mlflow or {}).get("run_id")
    logged = tracking.log_evaluation(
        params.mlflow,
        train_run,
        Path(out_model_dir),
        example,
        metrics={
            **{f"test_{k}": v for k, v in out["metrics"]["test"].items()},
            **{f"heldout_{k}": v for k, v in out["metrics"]["heldout"].items()},
        },
        artifacts=out["plots"] + out["files"],
        calibration=out["calibration"],
        promote=promote,
        reason=reason,
        champion_alias=params.promotion.alias,
        ood=out["ood"],
    )
    card = ModelCard.read(out_model_dir)
    dataclasses.replace(card, mlflow={**logged, "registered_model": params.mlflow.registered_model}).write(
        out_model_dir
    )
    print(
        f"{reason}; {params.mlflow.registered_model} v{logged['version']} "
        f"@{params.promotion.alias if promote else params.mlflow.alias}"
    )
    return {**out, "promoted": promote, "reason": reason, "mlflow": logged}
