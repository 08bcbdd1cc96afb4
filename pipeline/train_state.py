"""What a training checkpoint holds, as one dataclass: the save and the resume path both go
through `TrainState`, so a checkpoint's keys are its field names and are written nowhere else.

The same object is the loop's bookkeeping (history, best epoch, patience); `capture` adds the
live model/optimizer/scheduler states just before a checkpoint is written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

import numpy as np

from pipeline.checkpoints import CheckpointError


def rng_states() -> dict:
    """The generators' states, recorded for the record: a resume re-seeds by (seed, epoch) instead."""
    import torch

    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": np.random.get_state()[1].tolist(),
    }


@dataclass(kw_only=True)
class TrainState:
    """Enough to go on after `epoch` as if training had never stopped. The defaults are a fresh start.

    Only tensors, plain containers and numbers: it loads with weights_only=True (no unpickling).
    The field order is the order of the checkpoint's keys.
    """

    model: dict | None = None  # state dicts, set by capture()
    optimizer: dict | None = None
    scheduler: dict | None = None
    epoch: int = 0  # the last finished epoch (0: none yet)
    config: dict | None = None  # Params.to_dict() of the run that wrote it
    config_hash: str | None = None  # train.config_hash: a resume needs the same
    rng: dict | None = None  # rng_states() when it was written
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_val_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    best_model: dict | None = None  # the best epoch's weights
    world_size: int = 1
    mlflow_run_id: str | None = None  # the run that wrote it (marked KILLED if it died)

    def to_checkpoint(self) -> dict:
        """The dict torch.save writes (the objects themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, raw: dict, where: str = "checkpoint") -> "TrainState":
        """A state from what torch.load gave; CheckpointError when a field is missing."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in raw]
        if missing:
            raise CheckpointError(
                f"{where}: not a training checkpoint (no {', '.join(missing)}); start afresh with --fresh"
            )
        return cls(**{name: raw[name] for name in names})

    def restore(self, model, optimizer, scheduler) -> None:
        """Load the saved states into freshly built objects (the resume path)."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)

    def record(self, row: dict, model, keep: str) -> bool:
        """Add an epoch's history row; True when it becomes the kept model.

        keep: last takes every epoch (the schedule, not a held-out score, decides the model).
        """
        self.history.append(row)
        self.epoch = row["epoch"]
        improved = keep == "last" or row["val_auc"] > self.best_val_auc
        if improved:
            self.best_val_auc, self.best_epoch, self.bad_epochs = row["val_auc"], row["epoch"], 0
            self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return improved

    def capture(self, model, optimizer, scheduler, mlflow_run_id: str | None) -> "TrainState":
        """Take in the live objects' states and the generators', ready for to_checkpoint()."""
        self.model, self.optimizer, self.scheduler = model.state_dict(), optimizer.state_dict(), scheduler.state_dict()
        self.rng, self.mlflow_run_id = rng_states(), mlflow_run_id
        return self
