"""Load a trained model dir (model.pt + model.json) and score RGB images.

Preprocessing comes from the model's own metadata and the shared transforms module, so
training, evaluation and inference cannot drift apart.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.data.transforms import base_resize, to_tensor

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"


class ModelDirError(ValueError):
    """A model folder that is missing files or does not match its recorded checksums."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(model_dir: Path | str) -> dict:
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise ModelDirError(f"{model_dir}: not a model folder ({META_FILE} missing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{meta_path}: invalid JSON ({exc})") from None


class TorchPredictor:
    """Scores images with the eager torch model."""

    def __init__(self, model_dir: Path | str, batch_size: int = 32):
        import torch

        from pipeline.models.backbones import build_model

        self.model_dir = Path(model_dir)
        self.meta = read_metadata(self.model_dir)
        weights = self.model_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelDirError(f"{self.model_dir}: {WEIGHTS_FILE} missing")
        expected = self.meta.get("sha256", {}).get(WEIGHTS_FILE)
        if expected and file_sha256(weights) != expected:
            raise ModelDirError(f"{weights}: sha256 does not match {META_FILE}; the file was changed or corrupted")
        self.model = build_model(self.meta["arch"], len(self.meta["labels"]), weights=None)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().to(memory_format=torch.channels_last)
        self.labels = list(self.meta["labels"])
        self.batch_size = batch_size

    def preprocess(self, image: np.ndarray):
        """uint8 RGB HxWx3 (any size) -> normalised tensor, exactly as in training."""
        m = self.meta
        return to_tensor(base_resize(image, m["image_size"]), m["mean"], m["std"])

    def logits(self, batch):
        import torch

        with torch.inference_mode():
            return self.model(batch.contiguous(memory_format=torch.channels_last)).float()

    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        """Class probabilities, shape (N, n_labels)."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            out.append(torch.softmax(self.logits(batch), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)
