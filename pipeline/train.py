"""Train stage: fine-tune a backbone on the train split, early-stop on validation AUC.

`fit()` is the pure entry point; `run()` adds MLflow tracking and the stage's files.
Randomness is keyed by (seed, epoch): a resumed run reproduces an uninterrupted one.
"""
from __future__ import annotations

import contextlib
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

from pipeline import atomic
from pipeline.config import LabelMap, Params
from pipeline.data.manifest import SPLIT_COLUMNS, read_table

BEST = "best.pt"  # the best epoch's weights, also logged to MLflow


class TrainingError(RuntimeError):
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


def rng_states() -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": np.random.get_state()[1].tolist()}


def positive_index(labels: tuple[str, ...]) -> int | None:
    """Binary tasks score the second label (e.g. malignant); multi-class has none."""
    return 1 if len(labels) == 2 else None


def classification_metrics(probs: np.ndarray, targets: np.ndarray, labels: tuple[str, ...],
                           positive_labels: list[str] | None = None) -> dict:
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

def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, channels_last: bool, desc: str,
                    progress: bool = True, frozen: tuple = ()):
    """One pass over `loader`; returns (mean loss, images/s). Raises TrainingError on a non-finite loss.

    `frozen` modules (train.freeze_blocks) stay in eval mode so their BatchNorm statistics do not move.
    """
    import torch
    from tqdm import tqdm

    from pipeline.models.backbones import keep_frozen_eval

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
            raise TrainingError(f"non-finite loss ({loss.item()}) at {desc}, batch {step}; "
                                "the last good checkpoint is kept. Lower train.lr or check the data")
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


# ---------------------------------------------------------------- fit

def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resume_state(checkpoint_dir: Path, chash: str, resume: str, dist, warn) -> tuple[dict | None, dict]:
    """(state to resume from or None, the folder's manifest). Rank 0 resets a folder it starts afresh."""
    from pipeline import checkpoints

    manifest = checkpoints.read_manifest(checkpoint_dir)
    state = None
    if resume != "never" and manifest["checkpoints"] and not manifest["finished"]:
        try:
            loaded = checkpoints.load_latest(checkpoint_dir, warn=warn)
        except checkpoints.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        state = loaded[0] if loaded else None
        if state is not None and state.get("config_hash") != chash:
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


def fit(params: Params, split_csv: Path, model_dir: Path, checkpoint_dir: Path, resume: str = "auto",
        tracker=None, log=print, warn=_warn) -> FitResult:
    """Train, checkpoint every epoch (the last two are kept), keep the best model (by val AUC).

    resume: "auto" continues an unfinished run of the same config if a checkpoint exists,
    "require" insists on one, "never" starts afresh. `tracker` (optional) gets params,
    per-epoch metrics and artifacts (see pipeline.tracking.Run).
    Under torchrun every rank trains (DistributedDataParallel); rank 0 alone writes.
    """
    import torch

    from pipeline.checkpoints import FolderLock
    from pipeline.distributed import Context

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
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    from pipeline import checkpoints
    from pipeline.data.dataset import CellDataset
    from pipeline.distributed import state_digest
    from pipeline.inference.predictor import META_FILE, WEIGHTS_FILE, file_sha256
    from pipeline.models.backbones import build_model, freeze_early_blocks, preprocessing

    cfg, mcfg = params.train, params.model
    if dist.enabled and cfg.balance == "sampler":
        raise TrainingError("train.balance: sampler is not supported with several processes; use class_weights")
    if cfg.batch_size % dist.world_size:
        raise TrainingError(f"train.batch_size {cfg.batch_size} must divide by the {dist.world_size} processes "
                            "(it is the global batch)")
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)

    label_map = LabelMap.load(params.data.label_map)
    labels = label_map.labels
    split = read_table(split_csv, SPLIT_COLUMNS)
    split_sha = file_sha256(Path(split_csv))
    root = params.data.root
    fit_splits = ["train", "val"] if cfg.fit_on == "train+val" else ["train"]
    train_rows = _cap(split[split["split"].isin(fit_splits)], cfg.max_images, cfg.seed)
    val_rows = _cap(split[split["split"] == "val"], cfg.max_images, cfg.seed) if cfg.fit_on == "train" \
        else split.iloc[:0]
    model = build_model(mcfg.arch, len(labels), None if mcfg.init_from else mcfg.weights, mcfg.drop_rate)
    init = None
    if mcfg.init_from:  # fine-tune a registered model (e.g. @champion on a new specimen) instead of ImageNet's
        from pipeline.models.init_from import init_from_model
        from pipeline.tracking import tracking_uri

        init = init_from_model(model, mcfg.init_from, mcfg.arch, labels, tracking_uri(params.mlflow), warn)
        mean, std = tuple(init.pop("mean")), tuple(init.pop("std"))  # what its weights were trained with
    else:
        mean, std = preprocessing(mcfg, model)
    # Before the images are decoded: a backbone that cannot be frozen fails at once.
    frozen = tuple(freeze_early_blocks(model, cfg.freeze_blocks))
    # After init_from is resolved: when @champion moves, the same params are a different run.
    chash = config_hash(params, split_sha, dist.world_size, init["weights_sha256"] if init else None)
    state, manifest = _resume_state(checkpoint_dir, chash, resume, dist, warn)
    train_ds = CellDataset.from_frame(train_rows, root, labels, mcfg.image_size, cfg.augment, mean, std,
                                      seed=cfg.seed, desc="cache train")
    val_ds = CellDataset.from_frame(val_rows, root, labels, mcfg.image_size, "eval", mean, std, desc="cache val")

    counts = np.bincount(train_ds.targets, minlength=len(labels)).astype(float)
    if (counts == 0).any():
        missing = [labels[i] for i in np.flatnonzero(counts == 0)]
        raise TrainingError(f"the train split has no image labelled {', '.join(missing)}")
    class_weights = counts.sum() / (len(labels) * counts)
    criterion = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(class_weights, dtype=torch.float32, device=device) if cfg.balance == "class_weights" else None,
        label_smoothing=cfg.label_smoothing)
    eval_criterion = torch.nn.CrossEntropyLoss()

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]  # norms and biases
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    rank_batch = cfg.batch_size // dist.world_size
    rank_images = len(train_ds) // dist.world_size
    drop_last = rank_images > rank_batch  # a batch of one breaks BatchNorm
    steps_per_epoch = rank_images // rank_batch if drop_last else 1
    epochs = planned_epochs(cfg.epochs, cfg.min_steps, steps_per_epoch)
    if epochs > cfg.epochs:
        log(f"{epochs} epochs instead of {cfg.epochs}: {steps_per_epoch} steps per epoch would give fewer than "
            f"train.min_steps ({cfg.min_steps}) optimiser steps")
    total_steps = steps_per_epoch * epochs
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total_steps))

    history: list[dict] = []
    best_auc, best_epoch, bad_epochs, start_epoch, resumed_from = -1.0, 0, 0, 1, None
    best_state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best_auc, best_epoch, bad_epochs = state["best_val_auc"], state["best_epoch"], state["bad_epochs"]
        best_state = state["best_model"]
        start_epoch = resumed_from = state["epoch"] + 1
        log(f"resuming from {checkpoint_dir} after epoch {state['epoch']} "
            f"(best val AUC {best_auc:.4f} at epoch {best_epoch})")
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    config_dict = params.to_dict()
    if tracker is not None:
        tracker.start(config_dict, split_sha, chash, state, stale_run_id=manifest["mlflow_run_id"])
        checkpoints.update_manifest(checkpoint_dir, mlflow_run_id=tracker.run_id)
        for row in history:  # the resumed run carries the whole curve
            tracker.log_epoch(row)

    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers)
    stopped_early = False
    for epoch in range(start_epoch, epochs + 1):
        if cfg.keep == "best" and bad_epochs >= cfg.patience:
            stopped_early = True
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc., independent of where we resumed
        train_ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if dist.enabled:
            sampler = DistributedSampler(train_ds, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(train_ds, rank_batch, sampler=sampler, drop_last=drop_last, num_workers=cfg.num_workers)
        elif cfg.balance == "sampler":
            weights = torch.tensor([1.0 / counts[t] for t in train_ds.targets], dtype=torch.double)
            sampler = WeightedRandomSampler(weights, len(train_ds), replacement=True, generator=gen)
            loader = DataLoader(train_ds, cfg.batch_size, sampler=sampler, drop_last=drop_last, num_workers=cfg.num_workers)
        else:
            loader = DataLoader(train_ds, cfg.batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                                num_workers=cfg.num_workers)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, speed = train_one_epoch(net, loader, criterion, optimizer, scheduler, device,
                                            cfg.channels_last, f"epoch {epoch}/{epochs}", progress=dist.is_main,
                                            frozen=frozen)
        dist.sync_buffers(model)  # BatchNorm statistics: rank 0's, so every rank holds the same model
        if dist.is_main and len(val_ds):
            val_loss, probs, targets = evaluate(model, val_loader, eval_criterion, device, cfg.channels_last)
            val = classification_metrics(probs, targets, labels, params.evaluate.positive_labels)
            numbers = [train_loss, val_loss, val["auc"], val["balanced_accuracy"]]
        elif dist.is_main:  # train+val: nothing is held out
            numbers = [train_loss, math.nan, math.nan, math.nan]
        else:
            numbers = [0.0] * 4
        train_loss, val_loss, val_auc, val_bacc = dist.broadcast_floats(numbers)  # one early-stopping decision
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
               "val_balanced_accuracy": val_bacc, "lr": lr, "images_per_s": speed * dist.world_size,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        # keep: last takes every epoch (the schedule, not a held-out score, decides the model)
        improved = cfg.keep == "last" or val_auc > best_auc
        if improved:
            best_auc, best_epoch, bad_epochs = val_auc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        if dist.is_main:
            checkpoints.save(checkpoint_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "config": config_dict,
                "config_hash": chash, "rng": rng_states(), "history": history,
                "best_val_auc": best_auc, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "best_model": best_state, "world_size": dist.world_size,
                "mlflow_run_id": getattr(tracker, "run_id", None)}, epoch)
        if tracker is not None:
            tracker.log_epoch(row)
        watched = (f"val_loss {val_loss:.4f}  val_auc {val_auc:.4f}  val_bacc {val_bacc:.4f}  "
                   if math.isfinite(val_auc) else "")  # train+val: nothing held out to show
        log(f"epoch {epoch:>2}/{epochs}  train_loss {train_loss:.4f}  {watched}lr {lr:.2e}  "
            f"{row['images_per_s']:.1f} img/s  {row['seconds']:.0f}s" + ("  *best" if improved and cfg.keep == "best" else ""))

    digests = dist.gather_digests(state_digest(model.state_dict()))
    result = FitResult(history, best_epoch, best_auc, len(history), stopped_early, resumed_from, model_dir,
                       checkpoint_dir)
    if not dist.is_main:
        return result
    if len(set(digests)) > 1:
        raise TrainingError(f"the {dist.world_size} processes ended with different weights: {digests}")

    # ---- the model dir: best weights + everything inference needs
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(checkpoint_dir / BEST) as tmp:
        torch.save(best_state, tmp)
    with atomic.atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        torch.save(best_state, tmp)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    meta = {"arch": mcfg.arch, "labels": list(labels), "positive_label": labels[1] if len(labels) == 2 else None,
            "image_size": mcfg.image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize": "long side to image_size, pad square by repeating the edge",
            "label_map": label_map.path, "label_map_classes": label_map.classes,
            "best_epoch": best_epoch, "fit_on": cfg.fit_on, "keep": cfg.keep,
            "val_metrics": {k: _finite_or_none(best_row[k]) for k in ("val_auc", "val_balanced_accuracy", "val_loss")},
            "config_hash": chash, "split_sha256": split_sha, "init_from": init,
            "training": {"world_size": dist.world_size, "backend": dist.backend,
                         "final_weights_sha256_by_rank": digests},
            "sha256": {WEIGHTS_FILE: file_sha256(model_dir / WEIGHTS_FILE)}}
    atomic.write_json(model_dir / META_FILE, meta)
    checkpoints.update_manifest(checkpoint_dir, finished=True)
    return result


# ---------------------------------------------------------------- the stage

def write_reports(result: FitResult, reports_dir: Path, seconds: float) -> dict:
    """metrics.json (DVC metrics), history.csv (DVC plots) and curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    reports_dir = Path(reports_dir)
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    metrics = {"val_auc": _finite_or_none(best["val_auc"]),
               "val_balanced_accuracy": _finite_or_none(best["val_balanced_accuracy"]),
               "val_loss": _finite_or_none(best["val_loss"]), "train_loss": best["train_loss"], "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "stopped_early": result.stopped_early, "train_seconds": round(seconds, 1)}
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


def run(params: Params, split_csv: Path, manifest_csv: Path, model_dir: Path, checkpoint_dir: Path,
        reports_dir: Path, resume: str = "auto") -> tuple[FitResult, dict]:
    """The stage: fit with MLflow tracking, write reports, log and register the model."""
    import yaml

    from pipeline.distributed import Context
    from pipeline.inference.mlflow_pyfunc import input_example
    from pipeline.inference.predictor import META_FILE, read_metadata
    from pipeline.tracking import TrainingTracker

    if not Context.env_is_main():  # another rank of a torchrun job: train only, rank 0 reports
        result = fit(params, split_csv, model_dir, checkpoint_dir, resume)
        return result, {}
    tracker = TrainingTracker(params.mlflow, {"manifest": Path(manifest_csv), "split": Path(split_csv)})
    start = time.perf_counter()
    try:
        result = fit(params, split_csv, model_dir, checkpoint_dir, resume, tracker)
        metrics = write_reports(result, reports_dir, time.perf_counter() - start)
        r = tracker.run
        r.log_metrics({f"best_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=result.best_epoch)
        config_file = Path(checkpoint_dir) / "config.yaml"
        atomic.write_text(config_file, yaml.safe_dump(params.to_dict(), sort_keys=False))
        for path, folder in ((config_file, "config"), (split_csv, "data"), (Path(reports_dir) / "curves.png", "plots"),
                             (Path(reports_dir) / "history.csv", "plots"), (Path(checkpoint_dir) / BEST, "checkpoint")):
            r.log_artifact(path, folder)
        model_uri, version = r.log_model(Path(model_dir), input_example(params.data.root, split_csv))
        meta = read_metadata(model_dir)
        if meta.get("init_from"):  # which model this one was fine-tuned from
            r.set_tags({f"init_from.{k}": str(v) for k, v in meta["init_from"].items()})
        meta["mlflow"] = {"run_id": r.run_id, "model_uri": model_uri, "registered_model": params.mlflow.registered_model,
                          "version": version, "alias": params.mlflow.alias}
        atomic.write_json(Path(model_dir) / META_FILE, meta)
        result.run_ids.append(r.run_id)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result, {**metrics, "mlflow_run_id": r.run_id, "model_version": version}
