"""Load a model folder and score RGB images: eager torch (model.pt + model.json) or ONNX Runtime
(model.onnx + metadata.json, written by the export stage; needs no torch).

Preprocessing comes from the model's own metadata and the shared transforms module, so
training, evaluation and inference cannot drift apart.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data.transforms import base_resize, normalize

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
ONNX_META_FILE = "metadata.json"


class ModelDirError(ValueError):
    """A model folder that is missing files or does not match its recorded checksums."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_exported(model_dir: Path | str) -> bool:
    """An exported (ONNX) model folder, as opposed to a torch one."""
    return (Path(model_dir) / ONNX_META_FILE).is_file()


def read_metadata(model_dir: Path | str) -> dict:
    """model.json of a torch model folder, or metadata.json of an exported one."""
    model_dir = Path(model_dir)
    meta_path = model_dir / (ONNX_META_FILE if is_exported(model_dir) else META_FILE)
    if not meta_path.is_file():
        raise ModelDirError(f"{model_dir}: not a model folder ({META_FILE} or {ONNX_META_FILE} missing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{meta_path}: invalid JSON ({exc})") from None


def verify_sha256(path: Path, expected: str | None, meta_name: str) -> None:
    """Refuse a model file that does not match the checksum its metadata recorded."""
    if expected and file_sha256(path) != expected:
        raise ModelDirError(f"{path}: sha256 does not match {meta_name}; the file was changed or corrupted")


def load_guard(model_dir: Path, meta: dict) -> dict | None:
    """The OOD guard's parameters named in the metadata (None for a model made before it),
    checked against their recorded sha256 like the weights."""
    from pipeline import ood

    info = meta.get("ood")
    if not info:
        return None
    name = info.get("file") or ood.OOD_FILE
    path = model_dir / name
    meta_name = ONNX_META_FILE if is_exported(model_dir) else META_FILE
    if Path(name).name != name or not path.is_file():
        raise ModelDirError(f"{model_dir}: {name} missing ({meta_name} lists an OOD guard)")
    verify_sha256(path, (meta.get("sha256") or {}).get(name) or "missing", meta_name)
    try:
        return ood.load(path)
    except ood.OodError as exc:
        raise ModelDirError(str(exc)) from None


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral views of an NCHW batch (rotations of it and of its mirror)."""
    return [np.ascontiguousarray(np.rot90(b, k, axes=(2, 3))) for b in (batch, batch[..., ::-1]) for k in range(4)]


class Predictor:
    """What every backend shares: metadata, batching, calibration, P(malignant).

    Subclasses implement `_logits(batch)` on a normalised float32 NCHW numpy batch.
    """

    backend = "?"

    def __init__(self, model_dir: Path | str, meta: dict, batch_size: int):
        self.model_dir = Path(model_dir)
        self.meta = meta
        self.labels = list(meta["labels"])
        self.batch_size = batch_size
        self.ood = load_guard(self.model_dir, meta)
        self._warned_no_ood = False

    def preprocess_array(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 RGB images (any sizes) -> the normalised NCHW batch the model sees."""
        size = self.meta["image_size"]
        return self.normalize_batch(np.stack([base_resize(im, size) for im in images]))

    def normalize_batch(self, crops: np.ndarray) -> np.ndarray:
        """Already resized uint8 NHWC crops -> the normalised NCHW batch."""
        return normalize(crops, self.meta["mean"], self.meta["std"])

    @property
    def registered_version(self) -> str | None:
        """The registry version this copy was logged as (exported and newly logged models record
        it exactly); else the version its training registration noted; None if unregistered."""
        version = self.meta.get("registered_version") or (self.meta.get("mlflow") or {}).get("version")
        return str(version) if version not in (None, "") else None

    @property
    def calibration(self) -> dict:
        """Temperature, threshold, band... written by the evaluate stage (empty before it)."""
        return self.meta.get("calibration") or {}

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, penultimate features or None) from one forward pass; backends override."""
        return self._logits(batch), None

    def array_outputs(self, batch: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) for a normalised NCHW batch; with tta, both averaged over the 8 views."""
        if not tta:
            return self._forward(batch)
        outs = [self._forward(v) for v in tta_views(batch)]
        feats = None if outs[0][1] is None else np.mean([f for _, f in outs], axis=0)
        return np.mean([z for z, _ in outs], axis=0), feats

    def ood_scores(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """OOD score per row (higher = further from the training domain); NaN without a guard."""
        from pipeline import ood

        if self.ood is None:
            if not self._warned_no_ood:
                self._warned_no_ood = True
                print(f"warning: {self.model_dir} has no OOD guard ({ood.OOD_FILE}; rerun the evaluate stage): "
                      "every cell counts as in domain", file=sys.stderr)
            return np.full(len(logits), np.nan)
        if ood.needs_features(self.ood) and features is None:
            raise ModelDirError(f"{self.model_dir}: the model gives no features for its "
                                f"{ood.method_of(self.ood)} OOD guard")
        return ood.score(self.ood, features, logits)

    def in_domain(self, ood_scores: np.ndarray) -> np.ndarray:
        """True where a cell passes the OOD threshold (always, for a model without a guard)."""
        from pipeline import ood

        return ood.in_domain(self.ood, ood_scores)

    def array_scores(self, batch: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(calibrated probabilities, ood_score, in_domain) for a normalised batch, from one forward pass."""
        logits, features = self.array_outputs(batch, tta)
        scores = self.ood_scores(logits, features)
        return self.probabilities(logits), scores, self.in_domain(scores)

    def predict_scores(self, images: list[np.ndarray], tta: bool | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities (N, n_labels), ood_score (N,), in_domain (N,)) for RGB images."""
        tta = self.calibration.get("tta", False) if tta is None else tta
        parts = [self.array_scores(self.preprocess_array(images[start:start + self.batch_size]), tta)
                 for start in range(0, len(images), self.batch_size)]
        if not parts:
            return np.zeros((0, len(self.labels))), np.zeros(0), np.zeros(0, dtype=bool)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    def predict_outputs(self, images: list[np.ndarray], tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) for RGB images, batched: what the evaluate stage fits the guard on."""
        parts = [self.array_outputs(self.preprocess_array(images[start:start + self.batch_size]), tta)
                 for start in range(0, len(images), self.batch_size)]
        logits = np.concatenate([z for z, _ in parts]) if parts else np.zeros((0, len(self.labels)), np.float32)
        feats = None if not parts or parts[0][1] is None else np.concatenate([f for _, f in parts])
        return logits, feats

    def array_logits(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Logits for a normalised NCHW batch; with tta, the mean over the 8 dihedral views."""
        if not tta:
            return self._logits(batch)
        return np.mean([self._logits(v) for v in tta_views(batch)], axis=0)

    def predict_logits(self, images: list[np.ndarray], tta: bool | None = None) -> np.ndarray:
        """Raw logits, shape (N, n_labels). tta=None uses the setting the model was calibrated with."""
        tta = self.calibration.get("tta", False) if tta is None else tta
        out = [self.array_logits(self.preprocess_array(images[start:start + self.batch_size]), tta)
               for start in range(0, len(images), self.batch_size)]
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


class TorchPredictor(Predictor):
    """Scores images with the eager torch model."""

    backend = "torch"

    def __init__(self, model_dir: Path | str, batch_size: int = 32):
        import torch

        from pipeline.models.backbones import build_model

        model_dir = Path(model_dir)
        super().__init__(model_dir, read_metadata(model_dir), batch_size)
        weights = self.model_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelDirError(f"{self.model_dir}: {WEIGHTS_FILE} missing")
        verify_sha256(weights, self.meta.get("sha256", {}).get(WEIGHTS_FILE), META_FILE)
        self.model = build_model(self.meta["arch"], len(self.meta["labels"]), weights=None)
        try:  # weights_only: a file that needs arbitrary unpickling is refused, never run
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise ModelDirError(f"{weights}: not a plain weights file for {self.meta['arch']} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        self.model.eval().to(memory_format=torch.channels_last)

    def preprocess(self, image: np.ndarray):
        """uint8 RGB HxWx3 (any size) -> normalised tensor, exactly as in training."""
        import torch

        return torch.from_numpy(self.preprocess_array([image])[0])

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return self.model(x).float().numpy()

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        net = self.model
        if not all(hasattr(net, a) for a in ("forward_features", "forward_head", "get_classifier")):
            return self._logits(batch), None  # e.g. torchvision: no pooled features to guard with
        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
            return net.get_classifier()(feats).float().numpy(), feats.float().numpy()


class OnnxPredictor(Predictor):
    """Scores images with ONNX Runtime on an exported model folder; imports no torch."""

    backend = "onnx"

    def __init__(self, model_dir: Path | str, batch_size: int = 32, threads: int = 0, file: str | None = None):
        """`file`: the ONNX file to run (default: the one metadata.json serves, `onnx_file`)."""
        model_dir = Path(model_dir)
        super().__init__(model_dir, read_metadata(model_dir), batch_size)
        self.onnx_file = file or self.meta.get("onnx_file") or ONNX_FILE
        path = self.model_dir / self.onnx_file
        if Path(self.onnx_file).name != self.onnx_file or not path.is_file():
            raise ModelDirError(f"{self.model_dir}: {self.onnx_file} missing")
        # A file the metadata does not list is refused like a changed one.
        verify_sha256(path, self.meta.get("sha256", {}).get(self.onnx_file) or "missing", ONNX_META_FILE)
        self.precision = "int8" if self.onnx_file == INT8_FILE else "fp32"
        self.session = onnx_session(path, threads)
        self.input_name = self.meta.get("input_name", "input")

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if "features" not in (self.meta.get("outputs") or []):  # exported before the OOD guard
            return self._logits(batch), None
        logits, feats = self.session.run(["logits", "features"],
                                         {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return logits, feats

    def cams(self, batch: np.ndarray, label: int) -> np.ndarray:
        """Class activation maps (N, h, w) for one output label, from the graph's `cam` output."""
        cam = self.session.run(["cam"], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]
        return cam[:, label]


def onnx_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; threads=0 lets ONNX Runtime use every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: slide scoring shares the cores with detection threads, and
    # spinning cost nothing in bare throughput here (measured 186.7 vs 188.3 cells/s).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for corrupt graphs
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelDirError(f"{path}: not a loadable ONNX model ({first})") from None


def open_predictor(model_dir: Path | str, batch_size: int = 32, threads: int = 0):
    """The predictor a folder calls for: ONNX Runtime for an exported model, else eager torch.
    `threads`: ONNX Runtime intra-op threads (0: every core)."""
    if is_exported(model_dir):
        return OnnxPredictor(model_dir, batch_size=batch_size, threads=threads)
    return TorchPredictor(model_dir, batch_size=batch_size)
