"""Load a model folder and score RGB images: eager torch (model.pt + model.json) or ONNX Runtime
(model.onnx + metadata.json, written by the export stage; needs no torch).

Preprocessing, calibration and the OOD guard come from the model's own card (pipeline/model_card.py)
and the shared transforms module, so training, evaluation and inference cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import ood
from pipeline.calibration import Band, softmax
from pipeline.data.transforms import base_resize, normalize
from pipeline.model_card import INT8_FILE, WEIGHTS_FILE, Calibration, ModelCard, ModelDirError, card_file, is_exported
from pipeline.models.backbones import build_model
from pipeline.morphometry import model_files
from pipeline.morphometry.cells import measure_images
from pipeline.morphometry.segmentation import SegmentationSettings


def load_guard(model_dir: Path, card: ModelCard) -> dict | None:
    """The OOD guard's parameters named in the card (None for a model made before it),
    checked against their recorded sha256 like the weights."""
    if card.ood is None:
        return None
    if Path(card.ood.file).name != card.ood.file or not (model_dir / card.ood.file).is_file():
        raise ModelDirError(f"{model_dir}: {card.ood.file} missing ({card_file(model_dir)} lists an OOD guard)")
    path = card.verify(model_dir, card.ood.file)
    try:
        return ood.load(path)
    except ood.OodError as exc:
        raise ModelDirError(str(exc)) from None


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral views of an NCHW batch (rotations of it and of its mirror)."""
    return [np.ascontiguousarray(np.rot90(b, k, axes=(2, 3))) for b in (batch, batch[..., ::-1]) for k in range(4)]


@dataclass(frozen=True)
class Scores:
    """What scoring gives per cell: everything predict, evaluate, score-slide and the REST model report."""

    probs: np.ndarray  # (N, n_labels) calibrated class probabilities
    p_malignant: np.ndarray  # (N,) the summed probability of the positive labels
    call: np.ndarray  # (N,) benign / malignant / indeterminate, or "out of domain"
    ood_score: np.ndarray  # (N,) higher = further from the training domain; NaN without a guard
    in_domain: np.ndarray  # (N,) bool; always True without a guard

    @classmethod
    def concat(cls, parts: list["Scores"], n_labels: int) -> "Scores":
        if not parts:
            return cls(
                np.zeros((0, n_labels)), np.zeros(0), np.zeros(0, dtype=str), np.zeros(0), np.zeros(0, dtype=bool)
            )
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    def select(self, rows) -> "Scores":
        """The scores of `rows` (an index array or boolean mask), in that order."""
        return Scores(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.p_malignant)


class Predictor:
    """One scoring path for every backend: preprocessing, calibration, P(malignant), the band call
    and the OOD guard all follow the model card. Subclasses implement `_forward(batch)` on a
    normalised float32 NCHW numpy batch.

    `score(images)` is what callers use; `score_batch` takes crops already normalised (the slide
    path resizes while cropping); `outputs` / `image_outputs` give raw (logits, features) for the
    stages that fit calibration and the guard, and for the export's torch-vs-ONNX check.
    """

    backend = "?"

    def __init__(self, model_dir: Path | str, card: ModelCard, batch_size: int):
        self.model_dir = Path(model_dir)
        self.card = card
        self.labels = list(card.labels)
        self.batch_size = batch_size
        self.ood = load_guard(self.model_dir, card)
        # How cells are measured and which atypia score ships: as the morphometry stage did it.
        self.morphometry = model_files.settings_of(card)
        self.atypia_model = model_files.logistic_of(self.model_dir, card)
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- what the card says

    @property
    def calibration(self) -> Calibration:
        """The evaluate stage's calibration; before it, the one fallback (T 1, threshold 0.5, no band)."""
        return self.card.calibration_or_default

    @property
    def calibrated(self) -> bool:
        return self.card.calibration is not None

    @property
    def band(self) -> Band:
        return Band(self.calibration.threshold, self.calibration.band_width)

    @property
    def registered_version(self) -> str | None:
        return self.card.version

    @property
    def positive_labels(self) -> list[str]:
        labels = list(self.card.positive_labels())
        unknown = [x for x in labels if x not in self.labels]
        if not labels or unknown:
            raise ModelDirError(
                f"{self.model_dir}: positive labels {labels or '(none)'} do not name the model's "
                f"labels {self.labels}; set evaluate.positive_labels"
            )
        return labels

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"warning: {self.model_dir} {message}", file=sys.stderr)

    def measure(self, images: list[np.ndarray]):
        """Nuclear features and atypia scores of plain images (scale-free: no µm), one row per image."""
        cfg = self.morphometry
        method = cfg.atypia if self.atypia_model is not None else "criteria"
        features, _ = measure_images(images, cfg.size, SegmentationSettings.of(cfg), method, self.atypia_model)
        return features

    # ---------------------------------------------------------------- input

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 RGB images (any sizes) -> the normalised NCHW batch the model sees."""
        size = self.card.image_size
        return self.normalize(np.stack([base_resize(im, size) for im in images]))

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """Already resized uint8 NHWC crops -> the normalised NCHW batch."""
        pre = self.card.preprocessing
        return normalize(crops, pre.mean, pre.std)

    # ---------------------------------------------------------------- raw outputs

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, penultimate features or None) from one forward pass."""
        raise NotImplementedError

    def outputs(self, batch: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) for a normalised NCHW batch; with tta, both averaged over the 8 views."""
        if not tta:
            return self._forward(batch)
        outs = [self._forward(v) for v in tta_views(batch)]
        feats = None if outs[0][1] is None else np.mean([f for _, f in outs], axis=0)
        return np.mean([z for z, _ in outs], axis=0), feats

    def image_outputs(self, images: list[np.ndarray], tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) for RGB images, batched: what calibration and the guard are fitted on."""
        parts = [
            self.outputs(self.preprocess(images[start : start + self.batch_size]), tta)
            for start in range(0, len(images), self.batch_size)
        ]
        logits = np.concatenate([z for z, _ in parts]) if parts else np.zeros((0, len(self.labels)), np.float32)
        feats = None if not parts or parts[0][1] is None else np.concatenate([f for _, f in parts])
        return logits, feats

    # ---------------------------------------------------------------- scores

    def _ood_scores(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """OOD score per row (higher = further from the training domain); NaN without a guard."""
        if self.ood is None:
            self._warn_once(
                "ood", f"has no OOD guard ({ood.OOD_FILE}; rerun the evaluate stage): every cell counts as in domain"
            )
            return np.full(len(logits), np.nan)
        if ood.needs_features(self.ood) and features is None:
            raise ModelDirError(
                f"{self.model_dir}: the model gives no features for its {ood.method_of(self.ood)} OOD guard"
            )
        return ood.score(self.ood, features, logits)

    def _scores_from(self, logits: np.ndarray, features: np.ndarray | None) -> Scores:
        """Calibrated probabilities, P(malignant), the guarded band call and the OOD score."""
        if not self.calibrated:
            self._warn_once(
                "calibration",
                "has no calibration (run the evaluate stage); using temperature 1, "
                "threshold 0.5 and no indeterminate band",
            )
        probs = softmax(logits, float(self.calibration.temperature))
        ood_score = self._ood_scores(logits, features)
        in_domain = ood.in_domain(self.ood, ood_score)
        if not self.calibrated and not self.card.positive_labels():
            # A multi-class model before the evaluate stage names no malignant label: probabilities only.
            return Scores(
                probs, np.full(len(probs), np.nan), np.full(len(probs), "", dtype="<U1"), ood_score, in_domain
            )
        p = probs[:, [self.labels.index(x) for x in self.positive_labels]].sum(axis=1)
        return Scores(probs, p, ood.guard_calls(self.band.call(p), in_domain), ood_score, in_domain)

    def score_batch(self, batch: np.ndarray, tta: bool | None = None) -> Scores:
        """Scores for a normalised NCHW batch; tta=None uses the setting the model was calibrated with."""
        return self._scores_from(*self.outputs(batch, self.calibration.tta if tta is None else tta))

    def score(self, images: list[np.ndarray], tta: bool | None = None) -> Scores:
        """Scores for uint8 RGB images of any sizes, in batches of `batch_size`."""
        parts = [
            self.score_batch(self.preprocess(images[start : start + self.batch_size]), tta)
            for start in range(0, len(images), self.batch_size)
        ]
        return Scores.concat(parts, len(self.labels))


class TorchPredictor(Predictor):
    """Scores images with the eager torch model."""

    backend = "torch"

    def __init__(self, model_dir: Path | str, batch_size: int = 32):
        import torch

        model_dir = Path(model_dir)
        super().__init__(model_dir, ModelCard.read(model_dir), batch_size)
        weights = self.card.verify(self.model_dir, WEIGHTS_FILE, required=False)
        self.model = build_model(self.card.arch, len(self.labels), weights=None)
        try:  # weights_only: a file that needs arbitrary unpickling is refused, never run
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise ModelDirError(
                f"{weights}: not a plain weights file for {self.card.arch} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
        self.model.eval().to(memory_format=torch.channels_last)

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
        super().__init__(model_dir, ModelCard.read(model_dir), batch_size)
        export = self.card.export
        self.onnx_file = file or export.onnx_file
        path = self.card.verify(self.model_dir, self.onnx_file)  # a file the card does not list is refused
        self.precision = "int8" if self.onnx_file == INT8_FILE else "fp32"
        self.session = onnx_session(path, threads)
        self.input_name = export.input_name

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if "features" not in self.card.outputs:  # exported before the OOD guard
            return self._logits(batch), None
        logits, feats = self.session.run(
            ["logits", "features"], {self.input_name: np.ascontiguousarray(batch, np.float32)}
        )
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
