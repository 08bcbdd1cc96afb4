"""Evaluate stage on a tiny project, external-folder evaluation, promotion, and CV."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import evaluate, tracking
from pipeline.config import load_params
from pipeline.evaluate_folder import evaluate_folder
from pipeline.registry import resolve_model_dir
from pipeline.inference.predictor import TorchPredictor
from pipeline.model_card import ModelDirError
from pipeline.morphometry.cells import IMAGE_COLUMNS
from tests.conftest import ROOT, tree_digest


@pytest.fixture(scope="module")
def project(tiny_project):
    # The session's tiny project: minimums of 0, so that this tiny model is promoted; the refusal is
    # tested below, on a copy (tiny_project_copy) like every test here that logs to MLflow.
    return tiny_project


def test_stage_writes_calibrated_model_and_reports(project):
    root, out, params = project
    meta = json.loads((root / "models/calibrated/model.json").read_text())
    cal = meta["calibration"]
    assert cal["temperature"] > 0 and cal["tta"] is True
    assert cal["band"][0] <= cal["threshold"] <= cal["band"][1]
    assert cal["validation"]["sensitivity"] >= params.evaluate.target_sensitivity  # rule met on val
    assert cal["validation"]["nll_after"] <= cal["validation"]["nll_before"] + 1e-9
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    for name in (
        "roc_auc",
        "pr_auc",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "brier",
        "ece",
    ):
        value, lo, hi = (metrics["test"][f"{name}{s}"] for s in ("", "_ci_low", "_ci_high"))
        assert lo - 1e-9 <= value <= hi + 1e-9, name
    assert {"test_with_tta", "test_without_tta"} <= set(metrics) and 0 < metrics["test"]["coverage"] <= 1
    assert "normal_columnar_fpr" in metrics["test"]
    by_class = json.loads((root / "reports/evaluate/by_class.json").read_text())
    assert {r["original_class"] for r in by_class} == {
        "normal_superficiel",
        "normal_intermediate",
        "normal_columnar",
        "light_dysplastic",
        "moderate_dysplastic",
        "severe_dysplastic",
        "carcinoma_in_situ",
    }
    for name in ("roc.csv", "pr.csv", "confusion.csv", "reliability.csv", "test_predictions.csv"):
        assert len(pd.read_csv(root / "reports/evaluate" / name)) > 0, name
    preds = pd.read_csv(root / "reports/evaluate/test_predictions.csv")
    assert set(preds["call"]) <= {"benign", "malignant", "indeterminate"}


def test_metrics_and_files_are_logged_to_the_training_run(project):
    import mlflow

    root, out, params = project
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    train_run = json.loads((root / "models/train/model.json").read_text())["mlflow"]["run_id"]
    assert out["mlflow"]["run_id"] == train_run
    run = client.get_run(train_run)
    assert "test_roc_auc" in run.data.metrics and "test_sensitivity_ci_low" in run.data.metrics
    assert run.data.tags["promotion.decision"] == "promoted"
    logged = {a.path for a in client.list_artifacts(train_run, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/roc.csv", "evaluation/reliability.csv"} <= logged


def test_promotion_sets_champion_only_when_minimums_are_met(tiny_project_copy):
    import mlflow

    root, out, params = tiny_project_copy  # registers a version and moves @candidate
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    name = params.mlflow.registered_model
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == out["mlflow"]["version"]
    assert champion.tags["promotion.decision"] == "promoted"
    assert float(champion.tags["calibration.threshold"]) == pytest.approx(out["calibration"]["threshold"])

    strict = params.promotion.__class__(min_auc=0.999, min_sensitivity=0.999)
    promote, reason = evaluate.promotion_decision(
        {"roc_auc": 0.98, "sensitivity": 0.97}, params.__class__(**{**params.__dict__, "promotion": strict})
    )
    assert not promote and "test AUC 0.9800 < 0.999" in reason
    # Registering a version that is not promoted leaves @champion where it was.
    logged = tracking.log_evaluation(
        params.mlflow,
        None,
        root / "models/calibrated",
        pd.DataFrame({"image": [_b64(root)]}),
        metrics={"test_roc_auc": 0.5},
        artifacts=[],
        calibration=out["calibration"],
        promote=False,
        reason=reason,
        champion_alias="champion",
    )
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(champion.version)
    assert str(client.get_model_version_by_alias(name, "candidate").version) == logged["version"]
    assert client.get_model_version(name, logged["version"]).tags["promotion.decision"] == "not promoted"


def _b64(root: Path) -> str:
    from pipeline.inference.mlflow_pyfunc import encode_image_file

    split = pd.read_csv(root / "data/split/split.csv", dtype=str)
    source = Path(load_params(root / "params.yaml").data.source)
    return encode_image_file(source / split["path"].iloc[0])


def test_registry_uri_resolves_to_the_calibrated_model(project):
    root, out, params = project
    model_dir = resolve_model_dir(
        f"models:/{params.mlflow.registered_model}/{out['mlflow']['version']}", params.mlflow.tracking_uri
    )
    remote, local = TorchPredictor(model_dir), TorchPredictor(root / "models/calibrated")
    assert remote.calibration == local.calibration
    image = np.full((200, 200, 3), 180, dtype=np.uint8)
    np.testing.assert_allclose(remote.score([image]).probs, local.score([image]).probs, atol=1e-6)
    import mlflow

    from pipeline.calibration import Band

    served = mlflow.pyfunc.load_model(out["mlflow"]["model_uri"]).predict(pd.DataFrame({"image": [_b64(root)]}))
    assert list(served.columns) == [
        "prob_benign",
        "prob_malignant",
        "p_malignant",
        "call",
        "in_domain",
        "ood_score",
        *IMAGE_COLUMNS,
        "model_version",
        "error",
    ]
    assert served["error"].tolist() == [""]
    # The logged copy knows the version it was registered as (not the training registration's).
    assert served["model_version"].tolist() == [out["mlflow"]["version"]]
    split = pd.read_csv(root / "data/split/split.csv", dtype=str)
    from pipeline.data.images import load_rgb

    from pipeline.ood import guard_calls

    scores = local.score([np.asarray(load_rgb(Path(params.data.source) / split["path"].iloc[0]))])
    ood_local, in_local, p_local = scores.ood_score, scores.in_domain, scores.p_malignant
    np.testing.assert_allclose(served["p_malignant"], p_local, atol=1e-6)
    np.testing.assert_allclose(served["ood_score"].astype(float), ood_local, rtol=1e-5)
    band = Band(local.calibration.threshold, local.calibration.band_width)
    assert served["call"].tolist() == guard_calls(band.call(p_local), in_local).tolist()
    with pytest.raises(ModelDirError, match="cannot load from MLflow"):
        resolve_model_dir("models:/no-such-model@champion", params.mlflow.tracking_uri)
    with pytest.raises(ModelDirError, match="not a model folder"):
        resolve_model_dir(str(root / "nowhere"))


def test_external_folder_with_a_bad_file_and_an_excluded_class(project, tmp_path, herlev_dir):
    root, out, params = project
    data = tmp_path / "lab cases"
    for cls, n in (("normal_superficiel", 4), ("carcinoma_in_situ", 4), ("debris", 2)):
        source = herlev_dir / ("normal_intermediate" if cls == "debris" else cls)
        for p in sorted(source.iterdir())[:n]:
            (data / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, data / cls / p.name)
    (data / "carcinoma_in_situ" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    labels = tmp_path / "labels.yaml"
    labels.write_text(
        "labels: [benign, malignant]\nclasses:\n  normal_superficiel: benign\n"
        "  carcinoma_in_situ: malignant\n  debris: exclude\n"
    )
    before = tree_digest(data)
    out_dir = tmp_path / "report"
    report = evaluate_folder(str(root / "models/calibrated"), data, labels, out_dir, params.evaluate)
    assert report["n_scored"] == 10 and report["n_skipped"] == 1 and report["n_excluded"] == 2
    assert 0 <= report["metrics"]["roc_auc"]["value"] <= 1 and 0 < report["coverage"] <= 1
    assert {r["original_class"] for r in report["by_class"]} == {"normal_superficiel", "carcinoma_in_situ", "debris"}
    preds = pd.read_csv(out_dir / "predictions.csv")
    assert len(preds) == 10 and preds["p_malignant"].between(0, 1).all()
    rejects = pd.read_csv(out_dir / "rejects.csv")
    assert rejects["path"].tolist() == ["carcinoma_in_situ/broken.jpg"]
    assert json.loads((out_dir / "metrics.json").read_text())["n_excluded"] == 2
    assert tree_digest(data) == before


def test_cli_folder_mode_errors_are_one_line(project, tmp_path):
    root, _, _ = project
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "evaluate",
            "--params",
            str(root / "params.yaml"),
            "--model",
            str(tmp_path / "missing"),
            "--data",
            str(tmp_path),
            "--label-map",
            str(ROOT / "configs/labels/herlev_binary.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a model folder" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_cross_validation_logs_parent_and_child_runs(tiny_project_copy, tmp_path):
    import mlflow

    from pipeline import cv

    root, _, params = tiny_project_copy  # logs a parent run and one child run per fold
    summary = cv.run(params, root / "data/split/split.csv", tmp_path / "cv", tmp_path / "work", log=lambda *_: None)
    assert summary["folds"] == params.split.folds
    assert 0 <= summary["auc_mean"] <= 1 and summary["auc_sd"] >= 0
    folds = pd.read_csv(tmp_path / "cv" / "folds.csv")
    assert sorted(folds["fold"]) == list(range(params.split.folds))
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`cv.folds` = '%d'" % params.split.folds)
    assert len(parents) == 1 and parents[0].data.metrics["cv_auc_mean"] == pytest.approx(summary["auc_mean"])
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == params.split.folds
    assert all("heldout_auc" in c.data.metrics for c in children)


def test_a_model_trained_on_val_is_never_calibrated_on_val(project, tmp_path):
    root, _, params = project
    model = tmp_path / "model"
    shutil.copytree(root / "models/train", model)
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "fit_on": "train+val"}))
    with pytest.raises(evaluate.EvaluationError, match="trained on train\\+val.*--oof reports/cv/oof.csv"):
        evaluate.evaluate_split(params, model, root / "data/split/split.csv", tmp_path / "out", tmp_path / "reports")
    bad = tmp_path / "oof.csv"
    bad.write_text("path,label\na.jpg,benign\n")
    with pytest.raises(evaluate.EvaluationError, match="oof.csv: not out-of-fold predictions .*missing group"):
        evaluate.evaluate_split(
            params, model, root / "data/split/split.csv", tmp_path / "out", tmp_path / "reports", oof_csv=bad
        )
    assert not (tmp_path / "out").exists()


def test_held_out_evidence_and_card_of_the_val_calibrated_model(project):
    root, out, _ = project
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert metrics["heldout"]["source"] == "validation" and metrics["heldout"]["n"] == 109
    assert out["promoted"] and "validation AUC" in out["reason"]
    card = (root / "models/calibrated/model_card.md").read_text()
    assert f"| validation | 109 ({metrics['heldout']['n_groups']} groups) | {metrics['heldout']['roc_auc']:.3f}" in card
