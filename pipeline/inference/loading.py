"""Open the predictor a MODEL argument names (a model folder or an MLflow URI, see pipeline/registry.py)."""

from __future__ import annotations

from pipeline.inference.predictor import open_predictor
from pipeline.model_card import ModelDirError
from pipeline.registry import UNREGISTERED, model_error_message, pin_registered, resolve_model_dir


def load_predictor(model: str, tracking_uri: str | None = None, batch_size: int = 32, threads: int = 0):
    """(predictor, registered version or 'unregistered') for a model folder or MLflow URI.

    An exported model (model.onnx + metadata.json) runs on ONNX Runtime; a torch model folder
    on eager torch, the fallback."""
    uri, registered = pin_registered(model, tracking_uri)
    try:
        predictor = open_predictor(resolve_model_dir(uri, tracking_uri), batch_size=batch_size, threads=threads)
    except ModelDirError as exc:
        raise ModelDirError(model_error_message(model, exc)) from None
    return predictor, registered or predictor.registered_version or UNREGISTERED
