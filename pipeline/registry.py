"""Where a MODEL argument points: an MLflow registry URI (models:/NAME@ALIAS, models:/NAME/N,
runs:/...) or a local model folder; pinning an alias to the version it names now.

Below inference and training alike (models/init_from.py fine-tunes from a registered model); it
imports MLflow only when a URI needs it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model_card import META_FILE, ONNX_META_FILE, ModelDirError, is_model_dir

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
DEFAULT_MODEL = "models:/cytology-classifier@champion"
UNREGISTERED = "unregistered"


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding model.json (+ weights) for `model`, downloading from MLflow if needed."""
    path = Path(model)
    if not model.startswith(MLFLOW_SCHEMES):
        if is_model_dir(path):
            return path
        raise ModelDirError(
            f"{model}: not a model folder ({META_FILE} or {ONNX_META_FILE} missing) and not an MLflow URI "
            f"(models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH)"
        )
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as exc:  # MLflow raises several types for a missing model/alias/run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDirError(
            f"{model}: cannot load from MLflow at {mlflow.get_tracking_uri()} ({first}). "
            "Train one with `make run` (or `cytopipe train`) first"
        ) from None
    # An exported (ONNX) model first: a folder may hold both.
    found = sorted(local.rglob(ONNX_META_FILE)) or sorted(local.rglob(META_FILE))
    if not found:
        raise ModelDirError(
            f"{model}: the MLflow model holds no {META_FILE} or {ONNX_META_FILE}; it was not logged by cytopipe"
        )
    return found[0].parent


def model_error_message(model: str, exc: Exception) -> str:
    message = str(exc)
    if model != DEFAULT_MODEL:
        return message
    # resolve_model_dir's generic hint names only training; the alias also needs evaluate + promotion.
    cause = message.partition(". Train one with")[0]
    return (
        f"{cause}. No @champion model yet: train and evaluate one with `make run` (promotion sets "
        "@champion only when the model meets the promotion minimums in params.yaml), "
        "or pass --model models/calibrated"
    )


def pin_registered(model: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(URI to load, registered version) for models:/NAME@ALIAS or models:/NAME/N; (model, None) otherwise.

    The version comes from the registry: a logged model.json still carries the training
    registration's version. Pinning the alias first also keeps it from moving mid-run.
    """
    if not model.startswith("models:/"):
        return model, None
    ref = model[len("models:/") :].rstrip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if not name or not alias or "/" in alias:
            return model, None
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            version = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # noqa: BLE001 - resolve_model_dir reports why, in one line
            return model, None
        return f"models:/{name}/{version}", version
    name, _, version = ref.rpartition("/")
    return (model, version) if name and version.isdigit() else (model, None)
