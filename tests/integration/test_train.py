"""Training on the tiny config (64 px, <=32 images) over real Herlev cells (its pure parts:
tests/unit/test_train.py and tests/unit/models/test_backbones.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import checkpoints
from pipeline.models.backbones import build_model
from pipeline.train import TrainingError, fit
from tests.conftest import tree_digest
from tests.tiny_project import HERLEV, make_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not HERLEV.is_dir():
        pytest.fail(f"reference data missing: {HERLEV}")
    return make_split(tmp_path_factory.mktemp("tiny"), HERLEV)


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
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: x.sum() * float("nan"))
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
    manifest["checkpoints"] = [
        checkpoints.Entry(e.file, e.epoch, checkpoints._sha256(path)) if e.file == path.name else e
        for e in manifest["checkpoints"]
    ]
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
    resumed = fit(params, split_csv, tmp_path / "m", tmp_path / "ck", resume="require", warn=messages.append, **quiet)
    warning = messages[0]
    assert "epoch-0002.pt" in warning and "using the previous checkpoint epoch-0001.pt" in warning
    assert resumed.resumed_from_epoch == 2
    assert _stable(resumed.history) == _stable(full.history)
    assert torch.equal(
        torch.load(tmp_path / "m" / "model.pt", weights_only=True)["classifier.weight"],
        torch.load(tmp_path / "m_full" / "model.pt", weights_only=True)["classifier.weight"],
    )


def test_no_usable_checkpoint_is_a_clear_error(tiny, tmp_path):
    params, split_csv, _ = tiny
    with pytest.raises(KeyboardInterrupt):
        fit(
            _with_train(params, epochs=3),
            split_csv,
            tmp_path / "m",
            tmp_path / "ck",
            tracker=StopAfter(2),
            log=lambda *_: None,
        )
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
