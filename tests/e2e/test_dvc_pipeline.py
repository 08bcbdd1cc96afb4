"""`dvc repro` runs the stages (ingest -> ... -> export) in a scratch copy of the repo, and `dvc status` tracks the source."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import load_params
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _project_files() -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a clone of this work tree would hold."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file() and f != "dvc.lock"]


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _scratch_repo(tmp_path, herlev_dir) -> tuple[Path, dict]:
    """A copy of the project beside a copy of the data, in the same layout as the real checkout,
    so params.yaml's ../shared/data/herlev resolves unchanged and the test may change the data."""
    repo = tmp_path / "main"
    shutil.copytree(herlev_dir, tmp_path / "shared" / "data" / "herlev")
    for rel in _project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        DVC_NO_ANALYTICS="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    _run(["git", "init", "-q"], repo, env)
    return repo, env


def test_dvc_repro_ingest_and_split(tmp_path, herlev_dir):
    repo, env = _scratch_repo(tmp_path, herlev_dir)
    _run(["dvc", "repro", "split"], repo, env)
    split = pd.read_csv(repo / "data/split/split.csv", dtype={"group": str})
    assert len(split) == 722
    assert (split.groupby("group")["split"].nunique() == 1).all()
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "--with-deps", "split"], repo, env)
    dag = _run(["dvc", "dag"], repo, env)
    assert "ingest" in dag and "split" in dag and "train" in dag
    lock = (repo / "dvc.lock").read_text()
    assert "../shared/data/herlev" in lock and "nfiles: 723" in lock

    # Removing one image from the source is noticed.
    victim = next((tmp_path / "shared/data/herlev/normal_columnar").iterdir())
    victim.unlink()
    status = _run(["dvc", "status", "--with-deps", "split"], repo, env)
    assert "ingest" in status and "modified" in status and "shared/data/herlev" in status
    _run(["dvc", "repro", "split"], repo, env)
    assert len(pd.read_csv(repo / "data/ingest/manifest.csv")) == 721


def _herlev() -> Path:
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "herlev"
    if not (path / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {path} (tests need ../shared/data from the project root)")
    return path


@pytest.fixture(scope="module")
def shipped_repo(tmp_path_factory):
    """`dvc repro` of the whole pipeline on the tiny config in the shipped form: the model trains on
    train+val (keep: last) and is calibrated on the cv stage's out-of-fold predictions; promotion
    minimums at 0 so that it earns @champion."""
    repo, env = _scratch_repo(tmp_path_factory.mktemp("shipped"), _herlev())
    params = load_params(repo / "configs" / "tiny.yaml").to_dict()  # an overlay: written out whole
    params["train"].update(fit_on="train+val", keep="last")
    params["promotion"].update(min_oof_auc_ci_low=0.0, min_auc=0.0, min_sensitivity=0.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(git + ["add", "-A"], repo, env)
    _run(git + ["commit", "-qm", "scratch"], repo, env)  # dvc exp needs a commit
    _run(["dvc", "repro"], repo, env)
    return repo, env


def test_oof_predictions_cover_every_train_val_cell_once_never_from_its_own_group(shipped_repo):
    repo, _ = shipped_repo
    split = pd.read_csv(repo / "data/split/split.csv", dtype={"group": str})
    oof = pd.read_csv(repo / "reports/cv/oof.csv", dtype={"group": str})
    dev = split[split["split"] != "test"]
    assert sorted(oof["path"]) == sorted(dev["path"]) and oof["path"].is_unique
    assert not set(oof["path"]) & set(split.loc[split["split"] == "test", "path"])
    folds = dict(zip(dev["path"], dev["fold"]))
    assert all(folds[p] == f for p, f in zip(oof["path"], oof["fold"]))
    for fold, rows in oof.groupby("fold"):  # the fold model's own training cells share no group with them
        trained = pd.read_csv(repo / f"checkpoints/cv/fold{fold}/split.csv", dtype={"group": str})
        assert not set(trained.loc[trained["split"] == "train", "group"]) & set(rows["group"])
    assert np.isfinite(oof[["logit_benign", "logit_malignant", "tta_logit_malignant", "ood_score"]].to_numpy()).all()
    features = np.load(repo / "reports/cv/oof_features.npz", allow_pickle=False)
    assert list(features["path"]) == list(oof["path"]) and features["features"].shape[0] == len(oof)
    metrics = json.loads((repo / "reports/cv/metrics.json").read_text())
    assert metrics["oof"]["n"] == len(dev) and metrics["folds"] == 5
    assert metrics["oof"]["roc_auc_ci_low"] <= metrics["oof"]["roc_auc"] <= metrics["oof"]["roc_auc_ci_high"]


def test_calibration_and_ood_threshold_ignore_the_test_labels(shipped_repo, tmp_path):
    from pipeline import evaluate
    from pipeline.config import load_params

    repo, _ = shipped_repo
    shipped = json.loads((repo / "models/calibrated/model.json").read_text())
    assert shipped["calibration"]["validation"]["source"] == "out-of-fold"
    assert shipped["calibration"]["validation"]["n"] == len(pd.read_csv(repo / "reports/cv/oof.csv"))
    split = pd.read_csv(repo / "data/split/split.csv", dtype=str)
    test = split["split"] == "test"
    shuffled = split.copy()
    rng = np.random.default_rng(0)
    for col in ("label", "original_class"):
        shuffled.loc[test, col] = rng.permutation(split.loc[test, col].to_numpy())
    assert (shuffled.loc[test, "label"] != split.loc[test, "label"]).any()
    shuffled.to_csv(tmp_path / "split.csv", index=False)
    cwd = os.getcwd()
    os.chdir(repo)  # params.yaml's relative data paths
    try:
        out = evaluate.evaluate_split(
            load_params("params.yaml"),
            Path("models/train"),
            tmp_path / "split.csv",
            tmp_path / "model",
            tmp_path / "reports",
            log=lambda *_: None,
            oof_csv=Path("reports/cv/oof.csv"),
        )
    finally:
        os.chdir(cwd)
    for key in ("temperature", "threshold", "band"):
        assert out["calibration"][key] == shipped["calibration"][key]
    again = json.loads((tmp_path / "model" / "model.json").read_text())
    assert again["ood"]["threshold"] == shipped["ood"]["threshold"]
    assert (
        out["result"]["metrics"]["roc_auc"]["value"]
        != json.loads((repo / "reports/evaluate/metrics.json").read_text())["test"]["roc_auc"]
    )  # the labels did change


def test_model_card_is_generated_from_the_metrics_files_and_champion_is_set(shipped_repo):
    import mlflow

    repo, _ = shipped_repo
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    card = (repo / "models/calibrated/model_card.md").read_text()
    held, test = metrics["heldout"], metrics["test"]
    for flat in (held, test):
        row = (
            f"{flat['roc_auc']:.3f} [{flat['roc_auc_ci_low']:.3f}, {flat['roc_auc_ci_high']:.3f}] | "
            f"{flat['sensitivity']:.3f} [{flat['sensitivity_ci_low']:.3f}, {flat['sensitivity_ci_high']:.3f}]"
        )
        assert row in card
    assert (
        f"normal_columnar) cells are the commonest false positives: held-out false-positive rate "
        f"{held['normal_columnar_fpr']:.3f}" in card
    )
    assert f"temperature {metrics['calibration']['temperature']:.3f}" in card
    assert "pulmonary-artery" in card.lower() and "## Never validated on" in card
    meta = json.loads((repo / "models/calibrated/model.json").read_text())
    assert meta["card"]["heldout_auc"] == held["roc_auc"] and meta["card"]["promotion"] == "promoted"
    exported = repo / "models/exported"
    assert (exported / "model_card.md").read_text() == card
    assert json.loads((exported / "metadata.json").read_text())["card"] == meta["card"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cytology-classifier", "champion")
    assert str(champion.version) == json.loads((exported / "metadata.json").read_text())["registered_version"]
    assert f"version {champion.version}: promoted" in champion.description
    # MLflow resolves models:/ in the process's registry, whatever tracking_uri says: point it at this repo's
    # store (with none set it would open ./mlflow.db; once it asked whichever store an earlier test left set).
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{repo / 'mlflow.db'}")
    logged = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/cytology-classifier/{champion.version}", tracking_uri=f"sqlite:///{repo / 'mlflow.db'}"
        )
    )
    card_logged = next(logged.rglob("model_card.md")).read_text()
    assert f"Registered version: {champion.version}" in card_logged


def test_the_atypia_model_travels_with_the_model_and_both_scores_are_measured(shipped_repo):
    """The morphometry stage fits and measures both atypia scores; evaluate ships atypia.json with the
    calibrated model (sha256 in its card, coefficients in model_card.md); export carries it along."""
    repo, _ = shipped_repo
    metrics = json.loads((repo / "reports/morphometry/metrics.json").read_text())
    for name in ("criteria", "logistic"):
        for part in ("oof", "test"):
            m = metrics[name][part]
            assert 0 <= m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] <= 1 and m["n_measured"] <= m["n"]
    assert metrics["stack_oof"]["network"]["n"] == metrics["criteria"]["oof"]["n"]
    assert (repo / "reports/morphometry/contact_sheet.png").stat().st_size > 0
    features = pd.read_csv(repo / "reports/morphometry/features.csv")
    assert len(features) == metrics["n_cells"] and features["nc_ratio"].notna().mean() > 0.8
    for folder, card_name in (("models/calibrated", "model.json"), ("models/exported", "metadata.json")):
        card = json.loads((repo / folder / card_name).read_text())
        digest = hashlib.sha256((repo / folder / "atypia.json").read_bytes()).hexdigest()
        assert card["sha256"]["atypia.json"] == digest and card["morphometry"]["settings"]["atypia"] == "criteria"
    assert "## Atypia score (nuclear morphometry)" in (repo / "models/calibrated/model_card.md").read_text()


def test_dvc_train_stage_and_experiment_on_the_tiny_config(shipped_repo):
    repo, env = shipped_repo
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo, env)
    metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    # train+val: nothing is held out, so there is no val AUC; the schedule runs to its end
    assert metrics["epochs_run"] == 2 and metrics["val_auc"] is None and metrics["train_loss"] > 0
    assert (repo / "models/train/model.pt").is_file()
    version = lambda d: json.loads((repo / d / "model.json").read_text())["mlflow"]["version"]  # noqa: E731
    exported = lambda: json.loads((repo / "models/exported/metadata.json").read_text())  # noqa: E731
    assert (version("models/train"), version("models/calibrated")) == ("1", "2")
    assert exported()["registered_version"] == "3" and exported()["source"]["version"] == "2"
    shown = _run(["dvc", "metrics", "show"], repo, env)
    assert "train_loss" in shown and "roc_auc" in shown and "auc_mean" in shown and "max_abs_diff" in shown
    assert (repo / "reports/cv/folds.csv").is_file()

    _run(["dvc", "exp", "run", "-S", "train.lr=0.0005"], repo, env)
    shown = _run(["dvc", "exp", "show", "--csv"], repo, env)
    assert "0.0005" in shown
    assert (version("models/train"), version("models/calibrated")) == ("4", "5")
    assert exported()["registered_version"] == "6"


def test_dvc_retrain_on_herlev_plus_a_harvest_from_the_registered_model(tmp_path, herlev_dir):
    """Adapt to a new specimen: a first run registers a model; then a harvested source is added to
    data.sources and model.init_from points at that model; `dvc repro` retrains from it on both."""
    from pipeline import harvest
    from tests.harvest_slides import LABELS, write_labels, write_slide

    repo, env = _scratch_repo(tmp_path, herlev_dir)
    tiny = load_params(repo / "configs" / "tiny.yaml").to_dict()  # an overlay on params.yaml: written out whole
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    _run(["dvc", "repro", "train"], repo, env)  # Herlev only: registers v1 @candidate

    slides = tmp_path / "slides"
    for name, seed in (("slide-a", 1), ("slide-b", 2)):
        slide, cells = write_slide(slides, name, seed)
        harvest.run(slide, cells, write_labels(slides / f"{name}-labels.csv", cells), repo / "data/harvest", 0.25)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["sources"]["harvest"] = {
        "path": "data/harvest/manifest.csv",
        "label_map": "configs/labels/harvest_binary.yaml",
        "group": {"column": "group"},
    }
    params["model"]["init_from"] = "models:/cytology-classifier@candidate"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(["dvc", "status", "--with-deps", "train"], repo, env)
    assert "ingest-source@harvest" in status

    _run(["dvc", "repro", "train"], repo, env)
    manifest = pd.read_csv(repo / "data/ingest/manifest.csv", dtype=str)
    assert manifest.groupby("source").size().to_dict() == {
        "harvest": 2 * LABELS.count("benign") + 2 * LABELS.count("malignant"),
        "herlev": 722,
    }
    assert set(manifest.loc[manifest["source"] == "harvest", "group"]) == {"harvest:slide-a", "harvest:slide-b"}
    meta = json.loads((repo / "models/train/model.json").read_text())
    assert meta["init_from"]["version"] == "1" and meta["init_from"]["head"] == "reused"
    assert meta["mlflow"]["version"] == "2"
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "--with-deps", "train"], repo, env)

    # A change in either source is noticed, each by its own stage.
    slide, cells = write_slide(slides, "slide-c", 3)
    harvest.run(slide, cells, write_labels(slides / "slide-c-labels.csv", cells), repo / "data/harvest", 0.25)
    status = _run(["dvc", "status", "--with-deps", "train"], repo, env)
    assert "ingest-source@harvest" in status and "ingest-source@herlev" not in status
    next((tmp_path / "shared/data/herlev/normal_columnar").iterdir()).unlink()
    status = _run(["dvc", "status", "--with-deps", "train"], repo, env)
    assert "ingest-source@harvest" in status and "ingest-source@herlev" in status
