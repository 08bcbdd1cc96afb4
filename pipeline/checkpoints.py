"""Crash-safe training checkpoints: the last two epochs, each verified by sha256.

Layout of a checkpoint folder:
  epoch-0007.pt, epoch-0008.pt   the two newest states (model, optimizer, scheduler, best model...)
  checkpoints.json               the commit point: newest first, with each file's sha256, plus the
                                 MLflow run that writes here and whether training finished
  .lock                          held (flock) while a training writes here

A new state is written under its own name, then the manifest is replaced atomically, then files
it no longer lists are deleted: a kill at any moment leaves a manifest naming complete files.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import atomic
from pipeline.errors import CytopipeError
from pipeline.model_card import file_sha256

MANIFEST = "checkpoints.json"
KEEP = 2


class CheckpointError(CytopipeError, RuntimeError):
    """No usable checkpoint, or the folder is in use. One line."""


@dataclass(frozen=True)
class Entry:
    file: str
    epoch: int
    sha256: str


def _sha256(path: Path) -> str:

    return file_sha256(path)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"checkpoints": [], "finished": False, "mlflow_run_id": None}
    try:
        raw = json.loads(path.read_text())
        raw["checkpoints"] = [Entry(**e) for e in raw.get("checkpoints", [])]
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint manifest ({exc}); delete the folder to start afresh"
        ) from None
    raw.setdefault("finished", False)
    raw.setdefault("mlflow_run_id", None)
    return raw


def _write_manifest(folder: Path, manifest: dict) -> None:
    out = dict(manifest, checkpoints=[e.__dict__ for e in manifest["checkpoints"]])
    atomic.write_json(Path(folder) / MANIFEST, out)


def update_manifest(folder: Path, **fields) -> None:
    """Set top-level fields (e.g. finished, mlflow_run_id) atomically."""
    manifest = read_manifest(folder)
    manifest.update(fields)
    _write_manifest(folder, manifest)


def save(folder: Path, state: dict, epoch: int) -> Entry:
    """Write `state` for `epoch`, commit it as the newest, keep the previous one, drop older ones."""
    import torch

    folder = Path(folder)
    name = f"epoch-{epoch:04d}.pt"
    with atomic.atomic_path(folder / name) as tmp:
        torch.save(state, tmp)
    entry = Entry(name, epoch, _sha256(folder / name))
    manifest = read_manifest(folder)
    kept = [entry] + [e for e in manifest["checkpoints"] if e.file != name][: KEEP - 1]
    _write_manifest(folder, dict(manifest, checkpoints=kept, finished=False))
    listed = {e.file for e in kept}
    for old in folder.glob("epoch-*.pt"):
        if old.name not in listed:
            old.unlink(missing_ok=True)
    return entry


def load_latest(folder: Path, warn=None) -> tuple[dict, Entry] | None:
    """The newest checkpoint that matches its sha256 and loads; falls back to the previous one
    with a warning. None when the folder has none; CheckpointError when none is usable."""
    import torch

    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    folder = Path(folder)
    entries = read_manifest(folder)["checkpoints"]
    problems = []
    for i, entry in enumerate(entries):
        path = folder / entry.file
        if not path.is_file():
            reason = "missing"
        elif _sha256(path) != entry.sha256:
            reason = "sha256 does not match checkpoints.json (corrupted)"
        else:
            try:
                return torch.load(path, map_location="cpu", weights_only=True), entry
            except Exception as exc:  # noqa: BLE001 - any load failure means: use the previous one
                reason = f"cannot be loaded ({type(exc).__name__})"
        problems.append(f"{path}: {reason}")
        nxt = entries[i + 1].file if i + 1 < len(entries) else None
        warn(f"{path}: {reason}; " + (f"using the previous checkpoint {nxt}" if nxt else "no older checkpoint"))
    if problems:
        raise CheckpointError(f"{folder}: no usable checkpoint ({'; '.join(problems)}); start afresh with --fresh")
    return None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files a killed process left behind (atomic writes that never completed)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class FolderLock:
    """An exclusive flock on <folder>/.lock: two trainings never write one checkpoint folder.
    The kernel drops it when the process dies, even by SIGKILL."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"{self.path.parent}: another training is using this checkpoint folder") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
