"""model.init_from: start training from a registered (or saved) cytopipe model instead of ImageNet.

The URI is resolved like every MODEL argument (pipeline/registry.py). An exported
(ONNX) version, which is what @champion points to after the export stage, is followed to the
torch version it was exported from, whose weights are the ones to fine-tune. The weights are
checked against model.json's sha256 and loaded as tensors only (weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model_card import META_FILE, WEIGHTS_FILE, ModelCard, ModelDirError, export_source, is_exported
from pipeline.models.backbones import WeightsError, _reset_classifier, classifier_prefix
from pipeline.registry import pin_registered, resolve_model_dir


def _torch_model_dir(uri: str, tracking_uri: str | None) -> tuple[Path, ModelCard, str | None]:
    """(folder with model.pt + model.json, its card, registered version) for `uri`."""
    pinned, version = pin_registered(uri, tracking_uri)
    try:
        folder = resolve_model_dir(pinned, tracking_uri)
        if not (folder / META_FILE).is_file() and is_exported(folder):
            # An ONNX export: its card names the torch version it came from.
            source = export_source(folder)
            if not source.get("registered_model") or not source.get("version"):
                raise WeightsError(f"model.init_from: {uri} is an ONNX export that names no source torch model")
            version = str(source["version"])
            folder = resolve_model_dir(f"models:/{source['registered_model']}/{version}", tracking_uri)
        card = ModelCard.read(folder)
    except (ModelDirError, OSError) as exc:
        raise WeightsError(f"model.init_from: cannot resolve {uri}: {' '.join(str(exc).split())}") from None
    if version is None:  # a local folder: the version it was registered as, if any
        version = (card.mlflow or {}).get("version")
    return folder, card, None if version is None else str(version)


def init_from_model(model, uri: str, arch: str, labels: tuple[str, ...], tracking_uri: str | None, warn=print) -> dict:
    """Load the weights of the model at `uri` into `model`; returns the provenance to record.

    The classifier head is reused when the source model's labels are `labels` (same order),
    otherwise it is re-initialised, with a warning."""
    import torch

    folder, card, version = _torch_model_dir(uri, tracking_uri)
    if card.arch != arch:
        raise WeightsError(f"model.init_from: {uri} is a {card.arch} model, but model.arch is {arch}")
    weights = folder / WEIGHTS_FILE
    try:
        card.verify(folder, WEIGHTS_FILE)
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except ModelDirError as exc:
        raise WeightsError(f"model.init_from: {exc}") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(f"model.init_from: {weights}: not a loadable state dict ({type(exc).__name__})") from None
    head = classifier_prefix(model)
    reuse = card.labels == tuple(labels)
    body = state if reuse else {k: v for k, v in state.items() if not k.startswith(head + ".")}
    try:
        model.load_state_dict(body, strict=reuse)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise WeightsError(f"model.init_from: {uri} does not fit model.arch {arch}: {first}") from None
    if not reuse:
        _reset_classifier(model, head)
        warn(
            f"model.init_from: {uri} has labels {list(card.labels)}, not {list(labels)}; "
            "its classifier head is re-initialised"
        )
    name = (
        uri[len("models:/") :].split("@")[0].rsplit("/", 1)[0]
        if uri.startswith("models:/")
        else (card.mlflow or {}).get("registered_model")
    )
    return {
        "uri": uri,
        "version": version,
        "registered_model": name,
        "head": "reused" if reuse else "reinitialised",
        "weights_sha256": card.sha256_of(WEIGHTS_FILE),
        "mean": list(card.preprocessing.mean),
        "std": list(card.preprocessing.std),
    }
