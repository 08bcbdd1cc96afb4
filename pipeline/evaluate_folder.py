"""`cytopipe evaluate --data DIR`: measure an existing model on any folder of class subfolders
(a lab's own labelled cells), with the model's own calibration and guard, without retraining.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

from pipeline import atomic, ood
from pipeline.config import EXCLUDE, ConfigError, EvaluateConfig, GroupRule, LabelMap
from pipeline.data.ingest import discover
from pipeline.inference.predictor import open_predictor
from pipeline.measurement import EvaluationError, load_images, measure, positive_targets, summary_line, write_plots
from pipeline.metrics import calls_by_class
from pipeline.registry import resolve_model_dir


def evaluate_folder(
    model: str,
    data_dir: Path,
    label_map_path: Path,
    out_dir: Path,
    cfg: EvaluateConfig,
    group_regex: str | None = None,
    tta: bool | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Measure a model on a folder of class subfolders, with the model's own calibration.

    Unreadable files are reported and skipped; classes mapped to `exclude` are scored and
    reported per class but left out of the binary metrics. Without a group regex every image
    is its own group for the bootstrap.
    """
    # ONNX Runtime for an exported model, eager torch otherwise.
    predictor = open_predictor(resolve_model_dir(model, tracking_uri))
    calibration = predictor.calibration.to_dict()
    label_map = LabelMap.load(label_map_path)
    cases, images, rejects = _read_labelled_folder(Path(data_dir), label_map)

    scores = predictor.score(images, tta=tta)
    p, in_domain, band = scores.p_malignant, scores.in_domain, predictor.band
    frame = _predictions_frame(cases, label_map, group_regex, scores)
    out_dir = Path(out_dir)
    atomic.write_csv(out_dir / "predictions.csv", frame)
    atomic.write_csv(out_dir / "rejects.csv", pd.DataFrame(rejects, columns=["path", "original_class", "reason"]))
    included = frame["label"] != EXCLUDE
    report: dict = {
        "model": model,
        "data": str(data_dir),
        "n_scored": int(len(frame)),
        "n_skipped": len(rejects),
        "n_excluded": int((~included).sum()),
        "calibration": {k: calibration.get(k) for k in ("temperature", "threshold", "band_width", "tta")},
        "by_class": calls_by_class(frame["original_class"].to_numpy(), p, band.threshold, band.lower, band.upper),
        # Metrics below use every cell's P(malignant); out-of-domain cells are counted here.
        "n_out_of_domain": int((~in_domain).sum()),
        "fraction_out_of_domain": float((~in_domain).mean()),
        "ood_method": ood.method_of(predictor.ood) if predictor.ood is not None else None,
    }
    inc = frame[included]
    y = positive_targets(list(inc["label"]), predictor.positive_labels)
    if len(set(y.tolist())) == 2:
        result = measure(
            y, inc["p_malignant"].to_numpy(), list(inc["group"]), list(inc["original_class"]), calibration, cfg
        )
        report["metrics"] = result["metrics"]
        report["coverage"] = result["coverage"]
        write_plots(out_dir, y, inc["p_malignant"].to_numpy(), inc["call"].to_numpy(), cfg.ece_bins)
        print(summary_line("evaluate", result))
    else:
        report["metrics"] = None
        print("evaluate: the included cases hold one class only; binary metrics are not defined", file=sys.stderr)
    atomic.write_json(out_dir / "metrics.json", report)
    print(
        f"evaluate: {len(frame)} scored, {len(rejects)} skipped, {report['n_excluded']} excluded from metrics "
        f"-> {out_dir}"
    )
    return report


def _read_labelled_folder(data_dir: Path, label_map: LabelMap):
    """The readable cases of a folder of class subfolders, their images, and one reject row per file
    that could not be read (each also reported on stderr)."""
    rejects: list[dict] = []
    candidates = discover(data_dir, GroupRule(), rejects)
    missing = sorted({c.original_class for c in candidates} - set(label_map.classes))
    if missing:
        raise ConfigError(label_map.missing_message(missing))
    images, errors = load_images([c.path for c in candidates])
    for candidate, error in zip(candidates, errors):
        if error:
            reason = error.split(": ", 1)[-1]
            rejects.append({"path": candidate.rel, "original_class": candidate.original_class, "reason": reason})
    for r in rejects:
        print(f"skipped: {r['path']}: {r['reason']}", file=sys.stderr)
    ok = [i for i, e in enumerate(errors) if e is None]
    if not ok:
        raise EvaluationError(f"{data_dir}: no readable images ({len(rejects)} skipped)")
    return [candidates[i] for i in ok], [images[i] for i in ok], rejects


def _predictions_frame(cases, label_map: LabelMap, group_regex: str | None, scores) -> pd.DataFrame:
    """One row per scored case; without a group regex every image is its own bootstrap group."""
    pattern = re.compile(group_regex) if group_regex else None

    def group_of(c):
        m = pattern.search(c.path.name) if pattern else None
        return m.group(1) if m else c.rel

    return pd.DataFrame(
        {
            "path": [c.rel for c in cases],
            "original_class": [c.original_class for c in cases],
            "label": [label_map.classes[c.original_class] for c in cases],
            "group": [group_of(c) for c in cases],
            "p_malignant": scores.p_malignant,
            "call": scores.call,
            "ood_score": scores.ood_score,
            "in_domain": scores.in_domain,
        }
    )
