"""Train stage: fine-tune a backbone on the train split, early-stop on validation AUC.

`fit()` is the pure entry point; `run()` adds MLflow tracking and the stage's files.
Randomness is keyed by (seed, epoch): a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import atomic, checkpoints
from pipeline.checkpoints import FolderLock
from pipeline.config import LabelMap, Params
from pipeline.data.dataset import CellDataset
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.distributed import Context, state_digest
from pipeline.errors import CytopipeError
from pipeline.model_card import WEIGHTS_FILE, ModelCard, Preprocessing, file_sha256
from pipeline.models import backbones
from pipeline.models.backbones import freeze_early_blocks, keep_frozen_eval
from pipeline.models.init_from import init_from_model
from pipeline.tracking import TrainingTracker, input_example, tracking_uri
from pipeline.train_state import TrainState

BEST = "best.pt"  # the best epoch's weights, also logged to MLflow


class TrainingError(CytopipeError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint...). One line."""


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    model_dir: Path
    checkpoint_dir: Path
    run_ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- helpers


def config_hash(params: Params, split_sha: str, world_size: int = 1, init_sha: str | None = None) -> str:
    """What makes two runs the same run (threads/workers/device change speed, not results;
    the number of processes changes the batches each BatchNorm sees)."""
    train = {k: v for k, v in asdict(params.train).items() if k not in ("num_threads", "num_workers", "device")}
    payload = {"model": asdict(params.model), "train": train, "label_map": params.data.label_map, "split": split_sha}
    if world_size > 1:
        payload["world_size"] = world_size
    if init_sha:
        payload["init_weights_sha256"] = init_sha
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def positive_index(labels: tuple[str, ...]) -> int | None:
    """Binary tasks score the second label (e.g. malignant); multi-class has none."""
    return 1 if len(labels) == 2 else None


def classification_metrics(
    probs: np.ndarray, targets: np.ndarray, labels: tuple[str, ...], positive_labels: list[str] | None = None
) -> dict:
    """Validation AUC and balanced accuracy.

    The AUC is the clinical one, P(malignant) = summed probability of `positive_labels`, whenever
    those are labels of a multi-class model (e.g. 7-class Herlev); otherwise the binary AUC of the
    second label, or the macro one-vs-rest AUC.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    bacc = float(balanced_accuracy_score(targets, probs.argmax(1)))
    pos = [labels.index(x) for x in (positive_labels or []) if x in labels]
    if len(labels) == 2:
        y, score = targets == 1, probs[:, 1]
    elif pos and len(pos) == len(positive_labels):
        y, score = np.isin(targets, pos), probs[:, pos].sum(1)
    else:
        present = np.unique(targets)
        if len(present) < 3:
            return {"auc": float("nan"), "balanced_accuracy": bacc}
        p = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
        return {"auc": float(roc_auc_score(targets, p, multi_class="ovr", labels=present)), "balanced_accuracy": bacc}
    auc = roc_auc_score(y, score) if 0 < y.sum() < len(y) else float("nan")
    return {"auc": float(auc), "balanced_accuracy": bacc}


def planned_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """`epochs`, or more when they would give fewer than `min_steps` optimiser steps.

    Why: a fixed epoch count gives a lab's 90-cell dataset 3 steps an epoch, too few for the
    schedule to do anything; counting steps keeps a small dataset's training as long as a big one's.
    """
    return max(epochs, math.ceil(min_steps / max(1, steps_per_epoch)))


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric that was not measured (nothing held out) is null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _cap(frame, n: int, seed: int):
    """At most n rows, keeping both labels (tiny configs)."""
    if not n or len(frame) <= n:
        return frame
    import pandas as pd

    parts = [g.sample(max(1, round(n * len(g) / len(frame))), random_state=seed) for _, g in frame.groupby("label")]
    return pd.concat(parts).head(n)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- loops


def train_one_epoch(
    model,
    loader,
    criterion,
    optimizer,
    scheduler,
    device,
    channels_last: bool,
    desc: str,
    progress: bool = True,
    frozen: tuple = (),
):
    """One pass over `loader`; returns (mean loss, images/s). Raises TrainingError on a non-finite loss.

    `frozen` modules (train.freeze_blocks) stay in eval mode so their BatchNorm statistics do not move.
    """
    import torch
    from tqdm import tqdm

    model.train()
    keep_frozen_eval(frozen)
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if progress else True, file=sys.stderr, leave=False)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = criterion(model(x), y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at {desc}, batch {step}; "
                "the last good checkpoint is kept. Lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    return total / max(seen, 1), seen / (time.perf_counter() - start)


def evaluate(model, loader, criterion, device, channels_last: bool):
    """Returns (mean loss, probabilities (N, C), targets (N,))."""
    import torch

    model.eval()
    probs, targets, total = [], [], 0.0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            total += criterion(logits, y).item() * len(y)
            probs.append(torch.softmax(logits, 1).cpu().numpy())
            targets.append(y.cpu().numpy())
    p, t = np.concatenate(probs), np.concatenate(targets)
    return total / len(t), p, t


# ---------------------------------------------------------------- builders


@dataclass(frozen=True)
class ModelStart:
    """How the model's weights start: the normalisation they expect and, with model.init_from,
    the registered model they came from (None: ImageNet weights or a random init)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    init: dict | None


@dataclass(frozen=True)
class EpochPlan:
    """How the train images divide into steps and epochs, per process."""

    rank_batch: int  # images per process and step (train.batch_size is the global batch)
    drop_last: bool
    steps_per_epoch: int
    epochs: int


@dataclass
class TrainingParts:
    """What every epoch uses, built once by _fit."""

    model: object  # the bare model: what is checkpointed and saved
    net: object  # what trains: the model, or its DistributedDataParallel wrapper
    frozen: tuple  # modules kept in eval mode (train.freeze_blocks)
    train_ds: object
    val_loader: object
    counts: np.ndarray  # train images per class
    criterion: object
    optimizer: object
    scheduler: object
    plan: EpochPlan


def check_processes(cfg, dist) -> None:
    if dist.enabled and cfg.balance == "sampler":
        raise TrainingError("train.balance: sampler is not supported with several processes; use class_weights")
    if cfg.batch_size % dist.world_size:
        raise TrainingError(
            f"train.batch_size {cfg.batch_size} must divide by the {dist.world_size} processes (it is the global batch)"
        )


def seed_process(cfg, dist) -> None:
    """Threads, deterministic kernels and every generator's seed, before anything draws."""
    import torch

    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)


def load_split(params: Params, split_csv: Path):
    """(train rows, val rows, the split file's sha256); val is empty when train.fit_on is train+val."""
    cfg = params.train
    split = read_table(split_csv, SPLIT_COLUMNS)
    split_sha = file_sha256(Path(split_csv))
    fit_splits = ["train", "val"] if cfg.fit_on == "train+val" else ["train"]
    train_rows = _cap(split[split["split"].isin(fit_splits)], cfg.max_images, cfg.seed)
    val_rows = (
        _cap(split[split["split"] == "val"], cfg.max_images, cfg.seed) if cfg.fit_on == "train" else split.iloc[:0]
    )
    return train_rows, val_rows, split_sha


def build_model(params: Params, labels: tuple[str, ...], warn):
    """(model, ModelStart): the backbone with ImageNet (or no) weights, or a registered model's."""

    mcfg = params.model
    model = backbones.build_model(mcfg.arch, len(labels), None if mcfg.init_from else mcfg.weights, mcfg.drop_rate)
    init = None
    if mcfg.init_from:  # fine-tune a registered model (e.g. @champion on a new specimen) instead of ImageNet's
        init = init_from_model(model, mcfg.init_from, mcfg.arch, labels, tracking_uri(params.mlflow), warn)
        mean, std = tuple(init.pop("mean")), tuple(init.pop("std"))  # what its weights were trained with
    else:
        mean, std = backbones.preprocessing(mcfg, model)
    return model, ModelStart(mean, std, init)


def build_datasets(params: Params, train_rows, val_rows, labels: tuple[str, ...], start: ModelStart):

    cfg, root, size = params.train, params.data.root, params.model.image_size
    train_ds = CellDataset.from_frame(
        train_rows, root, labels, size, cfg.augment, start.mean, start.std, seed=cfg.seed, desc="cache train"
    )
    val_ds = CellDataset.from_frame(val_rows, root, labels, size, "eval", start.mean, start.std, desc="cache val")
    return train_ds, val_ds


def class_counts(train_ds, labels: tuple[str, ...]) -> np.ndarray:
    counts = np.bincount(train_ds.targets, minlength=len(labels)).astype(float)
    if (counts == 0).any():
        missing = [labels[i] for i in np.flatnonzero(counts == 0)]
        raise TrainingError(f"the train split has no image labelled {', '.join(missing)}")
    return counts


def build_criterion(counts: np.ndarray, cfg, device):
    import torch

    class_weights = counts.sum() / (len(counts) * counts)
    return torch.nn.CrossEntropyLoss(
        weight=torch.tensor(class_weights, dtype=torch.float32, device=device)
        if cfg.balance == "class_weights"
        else None,
        label_smoothing=cfg.label_smoothing,
    )


def to_device(model, device, channels_last: bool) -> None:
    import torch

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)


def build_optimizer(model, cfg):
    """AdamW over the trainable parameters; no weight decay on norms and biases."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]  # norms and biases
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


def plan_epochs(cfg, train_images: int, dist, log) -> EpochPlan:
    rank_batch = cfg.batch_size // dist.world_size
    rank_images = train_images // dist.world_size
    drop_last = rank_images > rank_batch  # a batch of one breaks BatchNorm
    steps_per_epoch = rank_images // rank_batch if drop_last else 1
    epochs = planned_epochs(cfg.epochs, cfg.min_steps, steps_per_epoch)
    if epochs > cfg.epochs:
        log(
            f"{epochs} epochs instead of {cfg.epochs}: {steps_per_epoch} steps per epoch would give fewer than "
            f"train.min_steps ({cfg.min_steps}) optimiser steps"
        )
    return EpochPlan(rank_batch, drop_last, steps_per_epoch, epochs)


def build_scheduler(optimizer, plan: EpochPlan, warmup_epochs: float):
    import torch

    total_steps = plan.steps_per_epoch * plan.epochs
    warmup = max(1, round(warmup_epochs * plan.steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total_steps))


def build_sampler(train_ds, counts: np.ndarray, cfg, dist, epoch: int):
    """(sampler, generator for the loader) of `epoch`, keyed by (seed, epoch).

    Several processes: each takes its share (DistributedSampler); train.balance: sampler draws every
    class equally often; otherwise a plain shuffle. Only the plain shuffle hands its generator to the
    loader too, which draws its worker seed from it (the others from torch's global generator):
    that is what DataLoader(shuffle=True, generator=...) did, so runs stay bit-identical.
    """
    import torch
    from torch.utils.data import RandomSampler, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    if dist.enabled:
        sampler = DistributedSampler(train_ds, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return sampler, None
    if cfg.balance == "sampler":
        weights = torch.tensor([1.0 / counts[t] for t in train_ds.targets], dtype=torch.double)
        return WeightedRandomSampler(weights, len(train_ds), replacement=True, generator=gen), None
    return RandomSampler(train_ds, generator=gen), gen


def build_train_loader(train_ds, counts: np.ndarray, cfg, plan: EpochPlan, dist, epoch: int):
    from torch.utils.data import DataLoader

    sampler, generator = build_sampler(train_ds, counts, cfg, dist, epoch)
    return DataLoader(
        train_ds,
        plan.rank_batch,
        sampler=sampler,
        drop_last=plan.drop_last,
        num_workers=cfg.num_workers,
        generator=generator,
    )


def build_val_loader(val_ds, cfg):
    from torch.utils.data import DataLoader

    return DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers)


def wrap_parallel(model, device, dist):
    """The model itself, or under torchrun its DistributedDataParallel wrapper."""
    import torch

    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


# ---------------------------------------------------------------- one epoch


def validate(model, val_loader, train_loss: float, labels, positive_labels, device, channels_last: bool, dist):
    """[train_loss, val_loss, val_auc, val_bacc] as rank 0 measured them, on every rank."""
    import torch

    if dist.is_main and len(val_loader.dataset):
        val_loss, probs, targets = evaluate(model, val_loader, torch.nn.CrossEntropyLoss(), device, channels_last)
        val = classification_metrics(probs, targets, labels, positive_labels)
        numbers = [train_loss, val_loss, val["auc"], val["balanced_accuracy"]]
    elif dist.is_main:  # train+val: nothing is held out
        numbers = [train_loss, math.nan, math.nan, math.nan]
    else:
        numbers = [0.0] * 4
    return dist.broadcast_floats(numbers)  # one early-stopping decision


def run_epoch(epoch: int, parts: TrainingParts, params: Params, labels, device, dist) -> dict:
    """Train one epoch, then validate: the epoch's history row."""
    import torch

    cfg = params.train
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc., independent of where we resumed
    parts.train_ds.set_epoch(epoch)
    loader = build_train_loader(parts.train_ds, parts.counts, cfg, parts.plan, dist, epoch)
    t0 = time.perf_counter()
    lr = parts.optimizer.param_groups[0]["lr"]
    train_loss, speed = train_one_epoch(
        parts.net,
        loader,
        parts.criterion,
        parts.optimizer,
        parts.scheduler,
        device,
        cfg.channels_last,
        f"epoch {epoch}/{parts.plan.epochs}",
        progress=dist.is_main,
        frozen=parts.frozen,
    )
    dist.sync_buffers(parts.model)  # BatchNorm statistics: rank 0's, so every rank holds the same model
    train_loss, val_loss, val_auc, val_bacc = validate(
        parts.model,
        parts.val_loader,
        train_loss,
        labels,
        params.evaluate.positive_labels,
        device,
        cfg.channels_last,
        dist,
    )
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_auc": val_auc,
        "val_balanced_accuracy": val_bacc,
        "lr": lr,
        "images_per_s": speed * dist.world_size,
        "seconds": time.perf_counter() - t0,
    }


def epoch_line(row: dict, epochs: int, best: bool) -> str:
    watched = (
        f"val_loss {row['val_loss']:.4f}  val_auc {row['val_auc']:.4f}  val_bacc {row['val_balanced_accuracy']:.4f}  "
        if math.isfinite(row["val_auc"])
        else ""
    )  # train+val: nothing held out to show
    return (
        f"epoch {row['epoch']:>2}/{epochs}  train_loss {row['train_loss']:.4f}  {watched}lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.1f} img/s  {row['seconds']:.0f}s" + ("  *best" if best else "")
    )


# ---------------------------------------------------------------- fit


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resume_state(checkpoint_dir: Path, chash: str, resume: str, dist, warn) -> tuple[TrainState | None, dict]:
    """(state to resume from or None, the folder's manifest). Rank 0 resets a folder it starts afresh."""

    manifest = checkpoints.read_manifest(checkpoint_dir)
    state = None
    if resume != "never" and manifest["checkpoints"] and not manifest["finished"]:
        try:
            loaded = checkpoints.load_latest(checkpoint_dir, warn=warn)
            state = TrainState.from_checkpoint(loaded[0], str(checkpoint_dir / loaded[1].file)) if loaded else None
        except checkpoints.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        if state is not None and state.config_hash != chash:
            if resume == "require":
                raise TrainingError(f"{checkpoint_dir}: cannot resume, the checkpoint was made with a different config")
            state = None
    if resume == "require" and state is None:
        why = "training there finished" if manifest["finished"] else "no checkpoint to resume from"
        raise TrainingError(f"{checkpoint_dir}: {why}")
    dist.barrier()  # every rank has read before rank 0 changes anything
    if dist.is_main:
        checkpoints.remove_stale_temp_files(checkpoint_dir)
        if state is None:
            for old in checkpoint_dir.glob("epoch-*.pt"):
                old.unlink(missing_ok=True)
            checkpoints.update_manifest(checkpoint_dir, checkpoints=[], finished=False)
    return state, manifest


def _start_tracking(
    tracker, state: TrainState, resumed: TrainState | None, split_sha: str, manifest: dict, checkpoint_dir: Path
) -> None:
    """Open the MLflow run (marking the one a killed training left RUNNING) and replay the resumed curve."""

    tracker.start(
        state.config,
        split_sha,
        state.config_hash,
        resumed.to_checkpoint() if resumed else None,
        stale_run_id=manifest["mlflow_run_id"],
    )
    checkpoints.update_manifest(checkpoint_dir, mlflow_run_id=tracker.run_id)
    for row in state.history:  # the resumed run carries the whole curve
        tracker.log_epoch(row)


def fit(
    params: Params,
    split_csv: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    resume: str = "auto",
    tracker=None,
    log=print,
    warn=_warn,
) -> FitResult:
    """Train, checkpoint every epoch (the last two are kept), keep the best model (by val AUC).

    resume: "auto" continues an unfinished run of the same config if a checkpoint exists,
    "require" insists on one, "never" starts afresh. `tracker` (optional) gets params,
    per-epoch metrics and artifacts (see pipeline.tracking.Run).
    Under torchrun every rank trains (DistributedDataParallel); rank 0 alone writes.
    """
    import torch

    device = _device(params.train.device)
    dist = Context.from_env(cuda=device.type == "cuda")
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_main:
        tracker, log, warn = None, (lambda *_: None), (lambda *_: None)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(checkpoint_dir) if dist.is_main else contextlib.nullcontext()
    with lock:
        result = _fit(params, split_csv, Path(model_dir), checkpoint_dir, resume, tracker, log, warn, device, dist)
    dist.close()
    return result


def _fit(params, split_csv, model_dir, checkpoint_dir, resume, tracker, log, warn, device, dist) -> FitResult:
    """Build everything, then run the epochs. Each build may draw random numbers or fail early:
    the order of the builds is part of the result (same seed, same metrics), keep it."""

    cfg = params.train
    check_processes(cfg, dist)
    seed_process(cfg, dist)
    label_map = LabelMap.load(params.data.label_map)
    labels = label_map.labels
    train_rows, val_rows, split_sha = load_split(params, split_csv)
    model, start = build_model(params, labels, warn)
    # Before the images are decoded: a backbone that cannot be frozen fails at once.
    frozen = tuple(freeze_early_blocks(model, cfg.freeze_blocks))
    # After init_from is resolved: when @champion moves, the same params are a different run.
    chash = config_hash(params, split_sha, dist.world_size, start.init["weights_sha256"] if start.init else None)
    resumed, manifest = _resume_state(checkpoint_dir, chash, resume, dist, warn)
    train_ds, val_ds = build_datasets(params, train_rows, val_rows, labels, start)
    counts = class_counts(train_ds, labels)
    criterion = build_criterion(counts, cfg, device)
    to_device(model, device, cfg.channels_last)
    optimizer = build_optimizer(model, cfg)
    plan = plan_epochs(cfg, len(train_ds), dist, log)
    scheduler = build_scheduler(optimizer, plan, cfg.warmup_epochs)
    if resumed is not None:
        resumed.restore(model, optimizer, scheduler)
        log(
            f"resuming from {checkpoint_dir} after epoch {resumed.epoch} "
            f"(best val AUC {resumed.best_val_auc:.4f} at epoch {resumed.best_epoch})"
        )
    net = wrap_parallel(model, device, dist)
    state = dataclasses.replace(
        resumed or TrainState(), config=params.to_dict(), config_hash=chash, world_size=dist.world_size
    )
    if tracker is not None:
        _start_tracking(tracker, state, resumed, split_sha, manifest, checkpoint_dir)
    parts = TrainingParts(
        model, net, frozen, train_ds, build_val_loader(val_ds, cfg), counts, criterion, optimizer, scheduler, plan
    )
    stopped_early = False
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        if cfg.keep == "best" and state.bad_epochs >= cfg.patience:
            stopped_early = True
            break
        row = run_epoch(epoch, parts, params, labels, device, dist)
        improved = state.record(row, model, cfg.keep)
        if dist.is_main:
            state.capture(model, optimizer, scheduler, getattr(tracker, "run_id", None))
            checkpoints.save(checkpoint_dir, state.to_checkpoint(), epoch)
        if tracker is not None:
            tracker.log_epoch(row)
        log(epoch_line(row, plan.epochs, improved and cfg.keep == "best"))
    result = FitResult(
        state.history,
        state.best_epoch,
        state.best_val_auc,
        len(state.history),
        stopped_early,
        resumed.epoch + 1 if resumed else None,
        model_dir,
        checkpoint_dir,
    )
    _finish(result, state, model, params, label_map, start, chash, split_sha, dist)
    return result


def _finish(
    result: FitResult,
    state: TrainState,
    model,
    params: Params,
    label_map: LabelMap,
    start: ModelStart,
    chash: str,
    split_sha: str,
    dist,
) -> None:
    """Every rank must hold the same weights; rank 0 then writes the model dir and closes the checkpoint folder."""

    digests = dist.gather_digests(state_digest(model.state_dict()))
    if not dist.is_main:
        return
    if len(set(digests)) > 1:
        raise TrainingError(f"the {dist.world_size} processes ended with different weights: {digests}")
    _write_model_dir(
        result.model_dir, result.checkpoint_dir, state, params, label_map, start, chash, split_sha, dist, digests
    )
    checkpoints.update_manifest(result.checkpoint_dir, finished=True)


def _write_model_dir(
    model_dir: Path,
    checkpoint_dir: Path,
    state: TrainState,
    params: Params,
    label_map: LabelMap,
    start: ModelStart,
    chash: str,
    split_sha: str,
    dist,
    digests: list[str],
) -> None:
    """The model dir: the best weights + everything inference needs (and best.pt for MLflow)."""
    import torch

    cfg, mcfg, labels = params.train, params.model, label_map.labels
    best_state, best_epoch, history = state.best_model, state.best_epoch, state.history
    mean, std, init = start.mean, start.std, start.init
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(checkpoint_dir / BEST) as tmp:
        torch.save(best_state, tmp)
    with atomic.atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        torch.save(best_state, tmp)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    ModelCard(
        arch=mcfg.arch,
        labels=tuple(labels),
        positive_label=labels[1] if len(labels) == 2 else None,
        preprocessing=Preprocessing(mcfg.image_size, tuple(mean), tuple(std)),
        label_map=label_map.path,
        label_map_classes=label_map.classes,
        best_epoch=best_epoch,
        fit_on=cfg.fit_on,
        keep=cfg.keep,
        val_metrics={k: _finite_or_none(best_row[k]) for k in ("val_auc", "val_balanced_accuracy", "val_loss")},
        config_hash=chash,
        split_sha256=split_sha,
        init_from=init,
        training={"world_size": dist.world_size, "backend": dist.backend, "final_weights_sha256_by_rank": digests},
        sha256={WEIGHTS_FILE: file_sha256(model_dir / WEIGHTS_FILE)},
    ).write(model_dir)


# ---------------------------------------------------------------- the stage


def write_reports(result: FitResult, reports_dir: Path, seconds: float) -> dict:
    """metrics.json (DVC metrics), history.csv (DVC plots) and curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    reports_dir = Path(reports_dir)
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    metrics = {
        "val_auc": _finite_or_none(best["val_auc"]),
        "val_balanced_accuracy": _finite_or_none(best["val_balanced_accuracy"]),
        "val_loss": _finite_or_none(best["val_loss"]),
        "train_loss": best["train_loss"],
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_seconds": round(seconds, 1),
    }
    atomic.write_json(reports_dir / "metrics.json", metrics)
    history = pd.DataFrame(result.history)
    atomic.write_csv(reports_dir / "history.csv", history)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(history["epoch"], history["train_loss"], label="train")
    ax1.plot(history["epoch"], history["val_loss"], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(history["epoch"], history["val_auc"], label="val AUC")
    ax2.plot(history["epoch"], history["val_balanced_accuracy"], label="val balanced acc.")
    ax2.axvline(result.best_epoch, color="grey", linestyle=":", label="best")
    ax2.set(xlabel="epoch", title="validation")
    ax2.legend()
    fig.tight_layout()
    with atomic.atomic_path(reports_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return metrics


def run(
    params: Params,
    split_csv: Path,
    manifest_csv: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    reports_dir: Path,
    resume: str = "auto",
) -> tuple[FitResult, dict]:
    """The stage: fit with MLflow tracking, write reports, log and register the model."""
    import yaml

    if not Context.env_is_main():  # another rank of a torchrun job: train only, rank 0 reports
        result = fit(params, split_csv, model_dir, checkpoint_dir, resume)
        return result, {}
    tracker = TrainingTracker(params.mlflow, {"manifest": Path(manifest_csv), "split": Path(split_csv)})
    start = time.perf_counter()
    try:
        result = fit(params, split_csv, model_dir, checkpoint_dir, resume, tracker)
        metrics = write_reports(result, reports_dir, time.perf_counter() - start)
        r = tracker.run
        r.log_metrics(
            {f"best_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=result.best_epoch
        )
        config_file = Path(checkpoint_dir) / "config.yaml"
        atomic.write_text(config_file, yaml.safe_dump(params.to_dict(), sort_keys=False))
        for path, folder in (
            (config_file, "config"),
            (split_csv, "data"),
            (Path(reports_dir) / "curves.png", "plots"),
            (Path(reports_dir) / "history.csv", "plots"),
            (Path(checkpoint_dir) / BEST, "checkpoint"),
        ):
            r.log_artifact(path, folder)
        model_uri, version = r.log_model(Path(model_dir), input_example(params.data.root, split_csv))
        card = ModelCard.read(model_dir)
        if card.init_from:  # which model this one was fine-tuned from
            r.set_tags({f"init_from.{k}": str(v) for k, v in card.init_from.items()})
        dataclasses.replace(
            card,
            mlflow={
                "run_id": r.run_id,
                "model_uri": model_uri,
                "registered_model": params.mlflow.registered_model,
                "version": version,
                "alias": params.mlflow.alias,
            },
        ).write(model_dir)
        result.run_ids.append(r.run_id)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result, {**metrics, "mlflow_run_id": r.run_id, "model_version": version}
