"""Resolve MODEL arguments: an MLflow URI (models:/..., runs:/...) or a local model folder."""
from __future__ import annotations

from pathlib import Path

from pipeline.inference.predictor import META_FILE, ModelDirError

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding model.json (+ weights) for `model`, downloading from MLflow if needed."""
    path = Path(model)
    if not model.startswith(MLFLOW_SCHEMES):
        if (path / META_FILE).is_file():
            return path
        raise ModelDirError(f"{model}: not a model folder ({META_FILE} missing) and not an MLflow URI "
                            f"(models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH)")
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as exc:  # MLflow raises several types for a missing model/alias/run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDirError(f"{model}: cannot load from MLflow at {mlflow.get_tracking_uri()} ({first}). "
                            "Train one with `make run` (or `cytopipe train`) first") from None
    found = sorted(local.rglob(META_FILE))
    if not found:
        raise ModelDirError(f"{model}: the MLflow model holds no {META_FILE}; it was not logged by cytopipe")
    return found[0].parent
