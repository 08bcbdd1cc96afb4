"""Build a classifier from a timm or torchvision architecture; weights come from local files only.

`arch` is `timm/<name>` or `torchvision/<name>`. `weights` is:
- `imagenet`: the built-in EfficientNet-Lite0/1/2 ImageNet weights (timm/tf_efficientnet_lite0, 1, 2);
- null: random initialisation;
- a path to a state dict saved with `torch.save(model.state_dict())`. Every tensor except the
  final classifier must match the architecture; the classifier is re-initialised for our classes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CytopipeError
from pipeline.models.pretrained import BUILTIN, PREPROCESSING, imagenet_weights

BUILTIN_IMAGENET = "imagenet"


class WeightsError(CytopipeError, ValueError):
    """A weights file that is missing, unreadable or does not fit the architecture (one line)."""


def _create(arch: str, num_classes: int, drop_rate: float):
    family, _, name = arch.partition("/")
    if family == "timm":
        import timm

        if name not in timm.list_models():
            raise WeightsError(f"model.arch: unknown timm architecture '{name}'")
        # pretrained=False always: nothing is downloaded.
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if family == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise WeightsError(f"model.arch: unknown torchvision architecture '{name}'")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise WeightsError(f"model.arch: '{arch}' must look like timm/<name> or torchvision/<name>")


def classifier_prefix(model) -> str:
    """Name of the final Linear layer, whose shape depends on the number of classes."""
    import torch

    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not names:
        raise WeightsError("model has no Linear classifier layer")
    return names[-1]


def load_backbone_weights(model, path: Path | str) -> None:
    """Load a state dict into `model`, skipping only the classifier; anything else mismatched is an error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (model.weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(
            f"{path}: not a loadable state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own checkpoints
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    head = classifier_prefix(model) + "."
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in own if not k.startswith(head) and k not in body]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and tuple(body[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise WeightsError(f"{path}: does not match the architecture: {', '.join(parts)}")
    model.load_state_dict(body, strict=False)
    _reset_classifier(model, head[:-1])


def _reset_classifier(model, name: str) -> None:
    """Small init for the new head: timm's default (uniform, 1/sqrt(n_classes)) gives huge
    initial logits on 1280 features, and the large early gradients wreck the pretrained body."""
    import torch

    layer = model.get_submodule(name)
    torch.nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        torch.nn.init.zeros_(layer.bias)


def build_model(arch: str, num_classes: int, weights: str | None, drop_rate: float = 0.0):
    """A classifier with `num_classes` outputs, initialised as `weights` says."""
    model = _create(arch, num_classes, drop_rate)
    if weights == BUILTIN_IMAGENET:
        family, _, name = arch.partition("/")
        if family != "timm" or name not in BUILTIN:
            raise WeightsError(
                f"model.weights: '{BUILTIN_IMAGENET}' is built in for "
                f"{', '.join('timm/' + n for n in BUILTIN)} only; for {arch} give a local weights file or null"
            )
        try:
            path = imagenet_weights(name)
        except FileNotFoundError as exc:
            raise WeightsError(f"model.weights: {exc}") from None
        load_backbone_weights(model, path)
    elif weights:
        load_backbone_weights(model, weights)
    return model


def freeze_early_blocks(model, n_blocks: int) -> list:
    """Stop training the stem and the first `n_blocks` blocks; returns the frozen modules.

    Their parameters get requires_grad=False; the caller keeps the returned modules in eval mode while
    training (see keep_frozen_eval) so that their BatchNorm statistics stay as loaded too.
    Only backbones with `conv_stem` and `blocks` (timm's EfficientNet family) can be frozen this way.
    """
    if n_blocks == 0:
        return []
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "conv_stem") or blocks is None:
        raise WeightsError(
            f"train.freeze_blocks: {type(model).__name__} has no conv_stem/blocks to freeze; "
            "set train.freeze_blocks: 0 or use a timm EfficientNet"
        )
    if n_blocks >= len(blocks):
        raise WeightsError(f"train.freeze_blocks: {n_blocks} would freeze all {len(blocks)} blocks; use fewer")
    frozen = [model.conv_stem, getattr(model, "bn1", None), *list(blocks)[:n_blocks]]
    frozen = [m for m in frozen if m is not None]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    return frozen


def keep_frozen_eval(frozen: list) -> None:
    """After model.train(): frozen modules stay in eval mode (BatchNorm uses its stored statistics)."""
    for module in frozen:
        module.eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing(model_cfg, model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) the backbone was trained with."""
    if model_cfg.weights == BUILTIN_IMAGENET:
        return tuple(PREPROCESSING["mean"]), tuple(PREPROCESSING["std"])
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return (
        tuple(float(x) for x in pretrained_cfg.get("mean", IMAGENET_MEAN)),
        tuple(float(x) for x in pretrained_cfg.get("std", IMAGENET_STD)),
    )
