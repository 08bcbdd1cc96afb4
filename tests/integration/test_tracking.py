"""MLflow: a tiny training run records params, metrics, tags, artifacts and a registered model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import train
from pipeline.data.images import load_rgb
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.inference.mlflow_pyfunc import IMAGE_COLUMN, encode_image_file
from pipeline.inference.predictor import TorchPredictor
from pipeline.morphometry.cells import IMAGE_COLUMNS
from tests.tiny_project import make_split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    herlev = SHARED_DATA / "herlev"
    if not herlev.is_dir():
        pytest.fail(f"reference data missing: {herlev}")
    tmp = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("DVC_STAGE", "train")
    params, split_csv, manifest_csv = make_split(tmp, herlev)
    result, metrics = train.run(params, split_csv, manifest_csv, tmp / "model", tmp / "ck", tmp / "reports")
    mp.undo()
    return params, split_csv, tmp, result, metrics


def test_run_has_params_metrics_tags_and_artifacts(trained):
    import mlflow

    params, _, tmp, result, metrics = trained
    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.lr"] == str(params.train.lr) and p["model.arch"] == params.model.arch
    assert p["model.image_size"] == "64" and p["split.seed"] == str(params.split.seed)
    for name in ("train_loss", "val_loss", "val_auc", "val_balanced_accuracy", "lr", "images_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == list(range(1, result.epochs_run + 1)), name
    tags = run.data.tags
    assert len(tags["git.commit"]) in (40, 7) or tags["git.commit"] == "unknown"
    assert tags["git.dirty"] in ("true", "false")
    assert len(tags["manifest.sha256"]) == 64 and len(tags["split.sha256"]) == 64
    assert tags["dvc.stage"] == "train"
    assert tags["version.torch"].startswith("2.") and "version.timm" in tags and "version.mlflow" in tags
    artifacts = {
        a.path
        for folder in ("config", "data", "plots", "checkpoint")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "config/config.yaml",
        "data/split.csv",
        "plots/curves.png",
        "plots/history.csv",
        "checkpoint/best.pt",
    } <= artifacts
    assert (tmp / "reports" / "metrics.json").is_file() and (tmp / "reports" / "curves.png").stat().st_size > 0


def test_registered_model_reloads_with_equal_predictions(trained):
    import mlflow

    params, split_csv, tmp, _, metrics = trained
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_registry_uri(params.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(params.mlflow.registered_model, params.mlflow.alias)
    assert str(version.version) == metrics["model_version"] and version.run_id == metrics["mlflow_run_id"]
    assert version.tags["run_id"] == metrics["mlflow_run_id"]

    model = mlflow.pyfunc.load_model(f"models:/{params.mlflow.registered_model}@{params.mlflow.alias}")
    assert model.metadata.signature is not None
    split = read_table(split_csv, SPLIT_COLUMNS)
    root = Path(params.data.source)
    paths = [root / p for p in split[split["split"] == "test"]["path"].head(6)]
    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image_file(p) for p in paths]})
    served = model.predict(frame)
    local = TorchPredictor(tmp / "model").score([np.asarray(load_rgb(p)) for p in paths]).probs
    # The trained (not yet evaluated) model has no OOD guard: in domain, no score.
    assert list(served.columns) == [
        "prob_benign",
        "prob_malignant",
        "in_domain",
        "ood_score",
        *IMAGE_COLUMNS,
        "model_version",
        "error",
    ]
    assert served["in_domain"].tolist() == [True] * len(paths) and served["ood_score"].isna().all()
    assert set(served["error"]) == {""}
    assert served["model_version"].tolist() == [metrics["model_version"]] * len(paths)  # its own version
    probs = served[["prob_benign", "prob_malignant"]].to_numpy()
    np.testing.assert_allclose(probs, local, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
