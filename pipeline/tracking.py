"""The one place that talks to MLflow: tracking URI, runs, tags, logging, registry, aliases.

Default store: embedded `sqlite:///mlflow.db` in the project root, artifacts in `mlartifacts/`
beside it. `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params) points elsewhere,
e.g. at a tracking server.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from pipeline import card_markdown
from pipeline.config import MlflowConfig
from pipeline.data.manifest import SPLIT_COLUMNS, read_table, source_root
from pipeline.inference.predictor import open_predictor
from pipeline.model_card import ModelCard, card_file, file_sha256

LIBRARIES = ("torch", "torchvision", "timm", "albumentations", "mlflow", "numpy", "scikit-learn", "dvc")
MODEL_ARTIFACT = "model"
REQUIREMENTS = ("torch", "torchvision", "timm", "albumentations", "mlflow", "numpy", "pandas", "pillow")


def input_example(source: str, split_csv):
    """One real validation image, base64-encoded: the input example logged with every model."""
    import pandas as pd

    from pipeline.inference.mlflow_pyfunc import IMAGE_COLUMN, encode_image_file

    split = read_table(split_csv, SPLIT_COLUMNS)
    first = split[split["split"] == "val"]["path"].iloc[0]
    return pd.DataFrame({IMAGE_COLUMN: [encode_image_file(source_root(source) / first)]})


def tracking_uri(config: MlflowConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go to mlartifacts/ beside the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes: two processes creating or
    migrating the same new database (or the same experiment) at once make one of them fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup(config: MlflowConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with _store_lock(uri):
        experiment = mlflow.get_experiment_by_name(config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = _artifact_root(uri)
        if location:
            root = Path(location[len("file://") :])
            location = (root / config.experiment).as_uri()
        return mlflow.create_experiment(config.experiment, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = "null" if value is None else str(value)
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance_tags(inputs: dict[str, Path]) -> dict[str, str]:
    """git commit + dirty flag, sha256 of each input file, DVC stage, library versions."""
    tags = {
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc.stage": os.environ.get("DVC_STAGE", "none (run outside dvc)"),
        "python": platform.python_version(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    for name, path in inputs.items():
        tags[f"{name}.sha256"] = file_sha256(path)
    for lib in LIBRARIES:
        try:
            tags[f"version.{lib}"] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return tags


def next_version(client, name: str) -> str:
    """The version number the registry will give the next version of `name`."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        versions = []
    return str(max((int(v.version) for v in versions), default=0) + 1)


def mark_stale_runs(experiment_id: str, run_ids: list[str], status: str = "KILLED") -> None:
    """Close runs left RUNNING by a killed process, so they do not stay RUNNING forever."""
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except Exception:  # the run is gone (another store): nothing to close
            continue
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status=status)


class Run:
    """A training run: params, per-epoch metrics, tags, artifacts, then the model."""

    def __init__(
        self,
        config: MlflowConfig,
        run_name: str | None = None,
        run_id: str | None = None,
        nested: bool = False,
        tags: dict | None = None,
    ):
        import mlflow

        self.mlflow = mlflow
        self.config = config
        self.experiment_id = setup(config)
        if run_id is not None:  # reopen an existing run, e.g. to add evaluation to its training run
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, nested=nested, tags=tags)
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict) -> None:
        flat = flatten(params)
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.mlflow.log_params(dict(items[start : start + 100]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path | str, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def _log_staged(self, model_dir: Path, version: str, name: str, model_metadata, input_example, requirements):
        """Log a copy of model_dir whose metadata says `version`, registering it."""
        import shutil
        import tempfile

        from mlflow.models import infer_signature

        import pipeline.inference.mlflow_pyfunc as pyfunc_module

        with tempfile.TemporaryDirectory(prefix="cytopipe-log-") as tmp:
            staged = Path(tmp) / "model_dir"
            shutil.copytree(model_dir, staged)
            dataclasses.replace(ModelCard.read(staged), registered_version=version).write(staged, card_file(staged))
            markdown = staged / card_markdown.CARD_FILE
            if markdown.is_file():  # the logged card names the version it is registered as
                markdown.write_text(
                    card_markdown.set_version(markdown.read_text(encoding="utf-8"), version), encoding="utf-8"
                )
            output_example = pyfunc_module.predict_frame(open_predictor(staged), input_example)
            return self.mlflow.pyfunc.log_model(
                name=name,
                metadata=model_metadata,
                python_model=pyfunc_module.__file__,
                artifacts={"model_dir": str(staged)},
                signature=infer_signature(input_example, output_example),
                input_example=input_example,
                registered_model_name=self.config.registered_model,
                # Stated, not inferred: inference would re-import the model in a subprocess.
                pip_requirements=[f"{lib}=={metadata.version(lib)}" for lib in requirements],
            )

    def log_model(
        self,
        model_dir: Path,
        input_example,
        name: str = MODEL_ARTIFACT,
        model_metadata: dict | None = None,
        alias: str | None = None,
        requirements: tuple[str, ...] = REQUIREMENTS,
    ) -> tuple[str, str]:
        """Log the model dir as a pyfunc (code, not pickle), register it and set the alias.

        The logged copy's metadata records the version it is registered as, so a served model
        reports its own version. Returns (model URI, registered version).
        """
        client = self.mlflow.MlflowClient()
        registered = self.config.registered_model
        expected = next_version(client, registered)
        # The registry numbers versions past deleted ones, which no search shows: on a miss,
        # drop the version just made and log again under the number now known.
        for _ in range(3):
            info = self._log_staged(model_dir, expected, name, model_metadata, input_example, requirements)
            version = str(info.registered_model_version)
            if version == expected:
                break
            client.delete_model_version(registered, version)
            expected = str(int(version) + 1)
        else:
            raise RuntimeError(f"{registered}: other versions were registered while logging; run the stage again")
        client.set_registered_model_alias(registered, alias or self.config.alias, version)
        client.set_model_version_tag(registered, version, "run_id", self.run_id)
        facts = ModelCard.read(model_dir).card
        if facts:  # the registry UI shows the model card's summary as the version's description
            client.update_model_version(
                registered, version, description=card_markdown.summary_markdown(facts, registered, version)
            )
        return info.model_uri, version

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class TrainingTracker:
    """Connects `pipeline.train.fit` to an MLflow run (created when training starts)."""

    def __init__(
        self, config: MlflowConfig, inputs: dict[str, Path], nested: bool = False, run_name: str | None = None
    ):
        self.config = config
        self.inputs = inputs
        self.nested = nested
        self.run_name = run_name
        self.run: Run | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    def start(
        self, params: dict, split_sha: str, config_hash: str, state: dict | None, stale_run_id: str | None = None
    ) -> None:
        """Open the run. `stale_run_id`: the run that last wrote the checkpoint folder; if it is
        still RUNNING, its process died (the folder lock proves it) and it is marked KILLED."""
        self.run = Run(self.config, run_name=self.run_name, nested=self.nested)
        self.run.log_params(params)
        tags = provenance_tags(self.inputs)
        tags["config_hash"] = config_hash
        previous = (state or {}).get("mlflow_run_id")
        stale = [r for r in (stale_run_id, previous) if r and r != self.run_id]
        if stale:
            mark_stale_runs(self.run.experiment_id, list(dict.fromkeys(stale)))
        if previous:
            tags["resumed_from_run"] = previous
            tags["resumed_from_epoch"] = str(state["epoch"])
        self.run.set_tags(tags)

    def log_epoch(self, row: dict) -> None:
        # NaN: not measured (train+val leaves nothing held out)
        self.run.log_metrics({k: v for k, v in row.items() if k != "epoch" and v == v}, step=int(row["epoch"]))

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.end(status)


def _run_exists(run_id: str | None) -> bool:
    import mlflow

    if not run_id:
        return False
    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except Exception:  # not in this store
        return False


@contextmanager
def attached_run(config: MlflowConfig, run_id: str | None, fallback_name: str) -> Iterator[Run]:
    """Reopen `run_id` (the training run) when this store has it, else start a run named
    `fallback_name`; it ends FINISHED, or FAILED if the block raises."""
    setup(config)
    reopen = run_id if _run_exists(run_id) else None
    run = Run(config, run_name=None if reopen else fallback_name, run_id=reopen)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def log_evaluation(
    config: MlflowConfig,
    train_run_id: str | None,
    model_dir: Path,
    input_example,
    metrics: dict[str, float],
    artifacts: list[Path],
    calibration: dict,
    promote: bool,
    reason: str,
    champion_alias: str,
    ood: dict | None = None,
) -> dict:
    """Add test metrics and evaluation files to the training run, register the calibrated model
    (calibration in its metadata) as `candidate`, and give it `champion_alias` if `promote`."""
    import math

    with attached_run(config, train_run_id, "evaluate") as run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=0)
        for path in artifacts:
            run.log_artifact(path, "evaluation")
        metadata = {"calibration": calibration, **({"ood": ood} if ood else {})}
        model_uri, version = run.log_model(model_dir, input_example, name="calibrated_model", model_metadata=metadata)
        client = run.mlflow.MlflowClient()
        name = config.registered_model
        for key in ("temperature", "threshold", "band_width", "tta", "threshold_rule"):
            client.set_model_version_tag(name, version, f"calibration.{key}", str(calibration[key]))
        for key in ("method", "threshold", "pass_rate", "feature_dim"):  # the domain-shift guard (ood.npz)
            if ood:
                client.set_model_version_tag(name, version, f"ood.{key}", str(ood.get(key)))
        client.set_model_version_tag(name, version, "promotion.decision", "promoted" if promote else "not promoted")
        client.set_model_version_tag(name, version, "promotion.reason", reason)
        run.set_tags(
            {
                "promotion.decision": "promoted" if promote else "not promoted",
                "promotion.reason": reason,
                "promotion.model_version": version,
            }
        )
        if promote:
            client.set_registered_model_alias(name, champion_alias, version)
    return {"run_id": run.run_id, "model_uri": model_uri, "version": version, "promoted": promote}
