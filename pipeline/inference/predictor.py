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

    @property
    def calibration(self) -> dict:
        """Temperature, threshold, band... written by the evaluate stage (empty before it)."""
        return self.meta.get("calibration") or {}

    def batch_logits(self, batch, tta: bool = False):
        """Logits for a preprocessed batch; with tta, the mean over the 8 dihedral views."""
        import torch

        with torch.inference_mode():
            if not tta:
                return self.model(batch.contiguous(memory_format=torch.channels_last)).float()
            views = [torch.rot90(b, k, dims=(2, 3)) for b in (batch, batch.flip(3)) for k in range(4)]
            return torch.stack([self.model(v.contiguous(memory_format=torch.channels_last)).float()
                                for v in views]).mean(0)

    def predict_logits(self, images: list[np.ndarray], tta: bool | None = None) -> np.ndarray:
        """Raw logits, shape (N, n_labels). tta=None uses the setting the model was calibrated with."""
        import torch

        tta = self.calibration.get("tta", False) if tta is None else tta
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            out.append(self.batch_logits(batch, tta).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities from logits (temperature 1 before calibration)."""
        from pipeline.calibration import softmax

        return softmax(logits, float(self.calibration.get("temperature", 1.0)))

    def predict_proba(self, images: list[np.ndarray], tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities, shape (N, n_labels)."""
        return self.probabilities(self.predict_logits(images, tta))

    @property
    def positive_labels(self) -> list[str]:
        default = [self.meta["positive_label"]] if self.meta.get("positive_label") else []
        labels = self.calibration.get("positive_labels") or default
        unknown = [x for x in labels if x not in self.labels]
        if not labels or unknown:
            raise ModelDirError(f"{self.model_dir}: positive labels {labels or '(none)'} do not name the model's "
                                f"labels {self.labels}; set evaluate.positive_labels")
        return labels

    def malignant_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(malignant): the summed probability of the positive labels."""
        idx = [self.labels.index(x) for x in self.positive_labels]
        return probs[:, idx].sum(axis=1)
