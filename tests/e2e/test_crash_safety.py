"""Faults a real training meets: SIGKILL mid-epoch, torchrun with 2 processes (and a killed one),
two trainings sharing one MLflow store, two predicts at once. Every command runs as a subprocess,
exactly as a user would run it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline import checkpoints
from tests.conftest import ROOT, SHARED_DATA

HERLEV = SHARED_DATA / "herlev"
# Long enough epochs (~2 s) that a kill lands inside one.
KILL_CONFIG = {"train__epochs": 3, "train__max_images": 160}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data/ingest and data/split of the real Herlev cells, made once and copied into each project."""
    from pipeline.config import load_params
    from pipeline.data import ingest, split
    from pipeline.data.images import ImageLimits
    from tests.tiny_project import write_tiny_params

    if not (HERLEV / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {HERLEV}")
    base = tmp_path_factory.mktemp("prepared")
    params = load_params(write_tiny_params(base, HERLEV))
    d = params.data
    ingest.run(d.source, d.label_map, d.group, ImageLimits(d.min_side, d.max_pixels), str(base / "data/ingest"))
    split.run(base / "data/ingest/manifest.csv", params.split, base / "data/split")
    return base / "data"


@pytest.fixture
def make_project(prepared, tmp_path):
    from tests.tiny_project import write_tiny_params

    def make(name: str, **overrides) -> Path:
        project = tmp_path / name
        write_tiny_params(project, HERLEV, **overrides)
        shutil.copytree(prepared, project / "data")
        return project

    return make


def _env() -> dict:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)  # each project's params name its own store
    return env


def start(project: Path, *args: str, out=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=project,
        env=_env(),
        text=True,
        stdout=out,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def run_ok(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=project,
        env=_env(),
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"cytopipe {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def kill_after_first_checkpoint(proc: subprocess.Popen, folder: Path) -> dict:
    """SIGKILL the whole process group shortly after epoch 1 is committed (so inside epoch 2)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"training ended (rc {proc.returncode}) before it could be killed:\n{proc.stderr.read()[-3000:]}"
            )
        if (folder / checkpoints.MANIFEST).is_file() and checkpoints.read_manifest(folder)["checkpoints"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("no checkpoint within 300 s")
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    manifest = checkpoints.read_manifest(folder)
    assert not manifest["finished"] and manifest["mlflow_run_id"]
    return manifest


def client(project: Path):
    import mlflow

    return mlflow.MlflowClient(
        tracking_uri=f"sqlite:///{project / 'mlflow.db'}", registry_uri=f"sqlite:///{project / 'mlflow.db'}"
    )


def runs(project: Path) -> list:
    c = client(project)
    return c.search_runs([c.get_experiment_by_name("cytology").experiment_id])


def _stable_history(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "reports/train/history.csv").drop(columns=["seconds", "images_per_s"])


def _weights(project: Path):
    import torch

    return torch.load(project / "models/train/model.pt", weights_only=True)


def _no_temp_files(project: Path) -> list[str]:
    return [str(p) for p in project.rglob("*.tmp")]


def test_sigkill_mid_epoch_resumes_and_ends_like_an_uninterrupted_run(make_project):
    import torch

    reference = make_project("uninterrupted", **KILL_CONFIG)
    run_ok(reference, "train")

    project = make_project("killed", **KILL_CONFIG)
    folder = project / "checkpoints/train"
    proc = start(project, "train", out=subprocess.DEVNULL)
    manifest = kill_after_first_checkpoint(proc, folder)
    killed_at = manifest["checkpoints"][0].epoch
    killed_run = manifest["mlflow_run_id"]
    assert killed_at < KILL_CONFIG["train__epochs"]
    assert client(project).get_run(killed_run).info.status == "RUNNING"  # what a SIGKILL leaves

    again = run_ok(project, "train")
    # at most one epoch lost: it goes on from the last committed checkpoint
    assert f"resuming from checkpoints/train after epoch {killed_at}" in again.stdout
    assert "Traceback" not in again.stderr
    pd.testing.assert_frame_equal(_stable_history(project), _stable_history(reference))
    ref_metrics = pd.read_json(reference / "reports/train/metrics.json", typ="series").drop("train_seconds")
    got_metrics = pd.read_json(project / "reports/train/metrics.json", typ="series").drop("train_seconds")
    pd.testing.assert_series_equal(got_metrics, ref_metrics)
    ref_w, got_w = _weights(reference), _weights(project)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)

    c = client(project)
    assert c.get_run(killed_run).info.status == "KILLED"
    resumed = [r for r in runs(project) if r.info.run_id != killed_run]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    assert resumed[0].data.tags["resumed_from_run"] == killed_run
    assert resumed[0].data.tags["resumed_from_epoch"] == str(killed_at)
    assert _no_temp_files(project) == []


def _assert_ranks_agree(project: Path) -> None:
    from pipeline.distributed import state_digest
    from pipeline.model_card import ModelCard

    training = ModelCard.read(project / "models/train").training
    assert training["world_size"] == 2 and training["backend"] == "gloo"
    by_rank = training["final_weights_sha256_by_rank"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    last, _ = checkpoints.load_latest(project / "checkpoints/train")
    assert state_digest(last["model"]) == by_rank[0]  # the digest is of the weights actually saved


def test_torchrun_two_processes_train_one_model_and_log_one_run(make_project):
    project = make_project("ddp")
    proc = run_ok(project, "train", "--nproc", "2")
    assert "Traceback" not in proc.stderr
    _assert_ranks_agree(project)
    all_runs = runs(project)
    assert len(all_runs) == 1 and all_runs[0].info.status == "FINISHED"  # rank 0 alone logs
    versions = client(project).search_model_versions("name='cytology-classifier'")
    assert [str(v.version) for v in versions] == ["1"]
    assert "Traceback" not in proc.stderr
    assert len(pd.read_csv(project / "reports/train/history.csv")) == 2


def test_torchrun_killed_then_resumed(make_project):
    project = make_project("ddp_killed", **KILL_CONFIG)
    folder = project / "checkpoints/train"
    proc = start(project, "train", "--nproc", "2", out=subprocess.DEVNULL)
    manifest = kill_after_first_checkpoint(proc, folder)
    again = run_ok(project, "train", "--nproc", "2")
    assert f"after epoch {manifest['checkpoints'][0].epoch}" in again.stdout
    _assert_ranks_agree(project)
    assert client(project).get_run(manifest["mlflow_run_id"]).info.status == "KILLED"
    assert len(pd.read_csv(project / "reports/train/history.csv")) == KILL_CONFIG["train__epochs"]


def test_nproc_with_an_indivisible_batch_is_one_clear_error(make_project):
    project = make_project("ddp_bad", train__batch_size=7)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--nproc", "2"],
        cwd=project,
        env=_env(),
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "cytopipe train: error: train.batch_size 7 must divide by the 2 processes (it is the global batch)"
    ]


def test_a_failing_worker_fails_the_launch_in_one_line_per_process(make_project):
    project = make_project("ddp_fail")
    (project / "data/split/split.csv").write_text("not,a,split\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--nproc", "2"],
        cwd=project,
        env=_env(),
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "cytopipe train: error: distributed training failed (rank " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_trainings_share_one_new_mlflow_store(make_project):
    project = make_project("shared_store")
    assert not (project / "mlflow.db").exists()  # both race to create it
    procs = [
        start(
            project,
            "train",
            "--out",
            f"models/m{i}",
            "--checkpoints",
            f"checkpoints/c{i}",
            "--reports",
            f"reports/r{i}",
        )
        for i in (1, 2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    finished = runs(project)
    assert len(finished) == 2 and {r.info.status for r in finished} == {"FINISHED"}
    for r in finished:  # both runs intact: params, every epoch, the best metrics
        assert r.data.params["train.epochs"] == "2" and "best_val_auc" in r.data.metrics
        assert len(client(project).get_metric_history(r.info.run_id, "val_auc")) == 2
    versions = client(project).search_model_versions("name='cytology-classifier'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in finished}


def test_two_predicts_at_once_write_complete_files(make_project, tmp_path):
    project = make_project("predict_twice")
    run_ok(project, "train", "--fresh")
    images = sorted(HERLEV.rglob("*.jpg"))[:48]
    assert len(images) == 48
    procs = [
        start(project, "predict", *map(str, images), "--model", "models/train", "--out", f"out{i}.csv") for i in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    first, second = (pd.read_csv(project / f"out{i}.csv") for i in (1, 2))
    assert len(first) == len(second) == 48 and first["p_malignant"].notna().all()
    pd.testing.assert_frame_equal(first, second)
    assert _no_temp_files(project) == []
