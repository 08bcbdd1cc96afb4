"""The model folder's format, read and written through one typed object (the bottom floor).

A model folder is self-describing: model.json (eager torch: model.pt) or metadata.json (exported:
model.onnx) says what the network is, how its input is made, how its outputs are calibrated, which
out-of-domain guard travels with it, and the sha256 of every file it lists. Training writes it,
evaluate adds the calibration and the guard, export adds the ONNX facts, the registry adds the
version; inference reads it. Everyone does so through `ModelCard` (frozen: a stage changes it with
`dataclasses.replace` and writes the new card), so a key is spelled in exactly one place: here.

Nothing here imports torch, ONNX Runtime or another pipeline module but `atomic` and `errors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.errors import CytopipeError

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
ONNX_META_FILE = "metadata.json"
OOD_FILE = "ood.npz"  # the guard's parameters (pipeline/ood.py reads and writes it)
ATYPIA_FILE = "atypia.json"  # the fitted logistic atypia model (pipeline/morphometry/atypia.py)
RESIZE_RULE = "long side to image_size, pad square by repeating the edge"


class ModelDirError(CytopipeError, ValueError):
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


def card_file(model_dir: Path | str) -> str:
    """The card's file name in this folder: metadata.json when exported, else model.json."""
    return ONNX_META_FILE if is_exported(model_dir) else META_FILE


def is_model_dir(path: Path | str) -> bool:
    return (Path(path) / META_FILE).is_file() or (Path(path) / ONNX_META_FILE).is_file()


def export_source(model_dir: Path | str) -> dict:
    """The torch model an exported folder came from ({registered_model, version, ...}), read from
    its metadata.json alone: all that following an export back to its weights needs."""
    path = Path(model_dir) / ONNX_META_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: cannot read ({exc})") from None
    source = raw.get("source") if isinstance(raw, dict) else None
    return source if isinstance(source, dict) else {}


@dataclass(frozen=True)
class Preprocessing:
    """How a uint8 RGB image becomes the network's input (pipeline/data/transforms.py applies it)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize: str = RESIZE_RULE


@dataclass(frozen=True)
class Calibration:
    """Written by the evaluate stage. `Calibration()` is the one fallback for a model that was
    never calibrated: temperature 1, threshold 0.5, no indeterminate band, no TTA."""

    temperature: float = 1.0
    threshold: float = 0.5
    band_width: float = 0.0
    tta: bool = False
    positive_labels: tuple[str, ...] = ()
    threshold_rule: str | None = None
    target_sensitivity: float | None = None
    band: tuple[float, float] | None = None
    validation: dict | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "Calibration":
        return _calibration_from(raw)

    def to_dict(self) -> dict:
        return _calibration_dict(self)


@dataclass(frozen=True)
class OodGuard:
    """The out-of-domain guard's summary; its parameters are in `file` (npz), sha256-checked."""

    file: str
    method: str
    threshold: float
    pass_rate: float | None = None
    val_pass_rate: float | None = None
    feature_dim: int | None = None
    test_pass_rate: float | None = None
    settings: dict = field(default_factory=dict)  # the method's own knobs: k, shrinkage, pca_dim, normalize

    @classmethod
    def from_summary(cls, summary: dict, file: str = OOD_FILE, **extra) -> "OodGuard":
        """From pipeline.ood.summary() of the fitted parameters (plus, e.g., test_pass_rate)."""
        return _ood_from({"file": file, **summary, **extra})

    def to_dict(self) -> dict:
        return _ood_dict(self)


@dataclass(frozen=True)
class OnnxExport:
    """What the export stage adds: the served graph and how it was checked against torch."""

    onnx_file: str = ONNX_FILE
    opset: int | None = None
    input_name: str = "input"
    outputs: tuple[str, ...] = ("logits",)
    preprocessing: dict | None = None  # the human-readable recipe for users of the ONNX file alone
    source: dict | None = None
    validation: dict | None = None
    quantization: dict | None = None


@dataclass(frozen=True)
class ModelCard:
    """model.json / metadata.json, typed. Keys this version does not know are kept in `unknown`
    and written back unchanged, so a newer tool's card survives a round trip through this one."""

    arch: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    positive_label: str | None = None
    sha256: dict = field(default_factory=dict)
    # training
    label_map: str | None = None
    label_map_classes: Any = None
    best_epoch: int | None = None
    fit_on: str = "train"
    keep: str | None = None
    val_metrics: dict | None = None
    config_hash: str | None = None
    split_sha256: str | None = None
    init_from: dict | None = None
    training: dict | None = None
    # evaluate
    calibration: Calibration | None = None
    test_metrics: dict | None = None
    ood: OodGuard | None = None
    card: dict | None = None
    # morphometry: the atypia score shipped, the segmentation settings, the logistic model's coefficients
    # (its file is ATYPIA_FILE) and both scores' metrics
    morphometry: dict | None = None
    # registry
    mlflow: dict | None = None
    registered_version: str | None = None
    registered_model: str | None = None
    # export
    export: OnnxExport | None = None
    unknown: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- derived facts

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph outputs an exported model offers (the torch model computes what it is asked)."""
        return self.export.outputs if self.export else ()

    @property
    def calibration_or_default(self) -> Calibration:
        return self.calibration or Calibration()

    @property
    def version(self) -> str | None:
        """The registry version this copy was logged as (exported and newly logged models record
        it exactly); else the version its training registration noted; None if unregistered."""
        version = self.registered_version or (self.mlflow or {}).get("version")
        return str(version) if version not in (None, "") else None

    def positive_labels(self) -> tuple[str, ...]:
        """The labels whose probabilities sum to P(malignant): the calibration's, else the binary
        model's positive label; empty when neither names one."""
        if self.calibration and self.calibration.positive_labels:
            return self.calibration.positive_labels
        return (self.positive_label,) if self.positive_label else ()

    def sha256_of(self, name: str) -> str | None:
        return self.sha256.get(name)

    def with_file(self, name: str, digest: str | None) -> "ModelCard":
        """The card with `name`'s checksum recorded (None: the file is no longer listed)."""
        sha = {k: v for k, v in self.sha256.items() if k != name}
        if digest is not None:
            sha[name] = digest
        return dataclasses.replace(self, sha256=sha)

    # ---------------------------------------------------------------- JSON

    @classmethod
    def from_dict(cls, raw: dict, where: str = "model card", exported: bool | None = None) -> "ModelCard":
        """`exported`: read as metadata.json (True), model.json (False) or by its keys (None)."""
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ModelDirError(f"{where}: not a model card this version reads (missing {', '.join(missing)})")
        try:
            return _card_from_dict(raw, exported)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{where}: not a model card this version reads ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict:
        return _card_to_dict(self)

    @classmethod
    def read(cls, model_dir: Path | str) -> "ModelCard":
        """model.json of a torch model folder, or metadata.json of an exported one."""
        model_dir = Path(model_dir)
        path = model_dir / card_file(model_dir)
        if not path.is_file():
            raise ModelDirError(f"{model_dir}: not a model folder ({META_FILE} or {ONNX_META_FILE} missing)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelDirError(f"{path}: not a JSON object")
        return cls.from_dict(raw, str(path), exported=path.name == ONNX_META_FILE)

    def write(self, model_dir: Path | str, name: str | None = None) -> Path:
        """Atomically write the card into `model_dir` (as metadata.json when it describes an export)."""
        name = name or (ONNX_META_FILE if self.export else META_FILE)
        path = Path(model_dir) / name
        atomic.write_json(path, self.to_dict())
        return path

    def verify(self, model_dir: Path | str, name: str, required: bool = True) -> Path:
        """The path of `name` in `model_dir`, refused when it is missing, is not a plain file name,
        or does not match the checksum the card records (`required`: a file the card does not
        list is refused like a changed one)."""
        path = Path(model_dir) / name
        if Path(name).name != name or not path.is_file():
            raise ModelDirError(f"{model_dir}: {name} missing")
        expected = self.sha256.get(name) or ("missing" if required else None)
        if expected and file_sha256(path) != expected:
            raise ModelDirError(
                f"{path}: sha256 does not match {card_file(model_dir)}; the file was changed or corrupted"
            )
        return path


# -------------------------------------------------------------------- the JSON layout
# model.json keeps the flat layout every earlier version wrote (image_size, mean, std at the top;
# calibration and ood as objects); metadata.json adds the export's keys and, for users of the
# ONNX file alone, copies of the temperature, threshold and band at the top.

_REQUIRED = ("arch", "labels", "image_size", "mean", "std")
_PREPROCESSING_KEYS = ("image_size", "mean", "std", "interpolation", "resize")
_EXPORT_KEYS = ("onnx_file", "opset", "input_name", "outputs", "preprocessing", "source", "validation", "quantization")
_EXPORT_COPIES = ("format", "temperature", "threshold", "indeterminate_band")
_OOD_KNOWN = ("file", "method", "threshold", "pass_rate", "val_pass_rate", "feature_dim", "test_pass_rate")
_PLAIN_FIELDS = (
    "positive_label",
    "label_map",
    "label_map_classes",
    "best_epoch",
    "fit_on",
    "keep",
    "val_metrics",
    "config_hash",
    "split_sha256",
    "init_from",
    "training",
    "test_metrics",
    "card",
    "morphometry",
    "mlflow",
    "registered_version",
    "registered_model",
)


def _calibration_from(raw: dict) -> Calibration:
    values = {f.name: raw[f.name] for f in dataclasses.fields(Calibration) if raw.get(f.name) is not None}
    for name in ("positive_labels", "band"):
        if name in values:
            values[name] = tuple(values[name])
    for name in ("temperature", "threshold", "band_width"):
        if name in values:
            values[name] = float(values[name])
    return Calibration(**values)


def _ood_from(raw: dict) -> OodGuard:
    return OodGuard(
        file=raw.get("file") or OOD_FILE,
        method=raw.get("method") or "mahalanobis",
        threshold=float(raw["threshold"]),
        **{k: raw.get(k) for k in _OOD_KNOWN[3:]},
        settings={k: v for k, v in raw.items() if k not in _OOD_KNOWN},
    )


def _card_from_dict(raw: dict, exported: bool | None) -> ModelCard:
    pre = Preprocessing(
        image_size=int(raw["image_size"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        **{k: raw[k] for k in ("interpolation", "resize") if k in raw},
    )
    if exported is None:
        exported = raw.get("format") == "onnx" or "onnx_file" in raw
    export = None
    if exported:
        values = {k: raw[k] for k in _EXPORT_KEYS if k in raw}
        if "outputs" in values:
            values["outputs"] = tuple(values["outputs"] or ())
        export = OnnxExport(**values)
    taken = {"arch", "labels", "sha256", "calibration", "ood", *_PREPROCESSING_KEYS, *_PLAIN_FIELDS}
    if exported:
        taken |= {*_EXPORT_KEYS, *_EXPORT_COPIES}
    return ModelCard(
        arch=raw["arch"],
        labels=tuple(raw["labels"]),
        preprocessing=pre,
        sha256=dict(raw.get("sha256") or {}),
        calibration=_calibration_from(raw["calibration"]) if raw.get("calibration") else None,
        ood=_ood_from(raw["ood"]) if raw.get("ood") else None,
        export=export,
        unknown={k: v for k, v in raw.items() if k not in taken},
        **{k: raw[k] for k in _PLAIN_FIELDS if k in raw},
    )


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _calibration_dict(cal: Calibration) -> dict:
    return _plain(dataclasses.asdict(cal))


def _ood_dict(guard: OodGuard) -> dict:
    out = {k: getattr(guard, k) for k in _OOD_KNOWN}
    return _plain({**out, **guard.settings})


def _card_to_dict(card: ModelCard) -> dict:
    out: dict[str, Any] = {
        "arch": card.arch,
        "labels": list(card.labels),
        "positive_label": card.positive_label,
        **dataclasses.asdict(card.preprocessing),
    }
    for name in _PLAIN_FIELDS[1:]:
        value = getattr(card, name)
        if value is not None or name in ("init_from",):
            out[name] = value
    if card.calibration is not None:
        out["calibration"] = _calibration_dict(card.calibration)
    if card.ood is not None:
        out["ood"] = _ood_dict(card.ood)
    if card.export is not None:
        cal = card.calibration_or_default
        out.update(
            {
                "format": "onnx",
                **dataclasses.asdict(card.export),
                "temperature": card.calibration.temperature if card.calibration else None,
                "threshold": card.calibration.threshold if card.calibration else None,
                "indeterminate_band": list(cal.band) if card.calibration and cal.band is not None else None,
            }
        )
    out["sha256"] = dict(card.sha256)
    out.update(card.unknown)
    return _plain(out)
