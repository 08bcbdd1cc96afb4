"""params.yaml and configs/*.yaml -> typed, validated dataclasses.

Everything is validated once, here, so stages can trust their inputs. Errors name
the file and the key.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")
EXCLUDE = "exclude"
SPLITS = ("train", "val", "test")


# What str.splitlines() breaks on: a key or value holding one must not break the message.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""

    def __init__(self, message: object = ""):
        # Line breaks inside names taken from the file are shown escaped, as repr() would.
        super().__init__(str(message).translate(_LINE_BREAKS))


def _shown(value: object, text: bool = False) -> str:
    """repr() (str() if `text`) for a message, short, and safe for ints too long to print
    (YAML reads 0xfff... of any length; str() of an int over 4300 digits raises)."""
    try:
        shown = str(value) if text else repr(value)
    except ValueError:
        shown = f"<int of {value.bit_length()} bits>"
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _names(keys) -> str:
    """Keys for a message: YAML keys may be ints, bools, null... as well as strings."""
    return ", ".join(sorted({_shown(k, text=True) for k in keys}))


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except ValueError as exc:  # PyYAML's int(): a decimal integer over 4300 digits
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _section(raw: dict, key: str, allowed: set[str], where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in '{key}': {_names(unknown)}")
    return value


@dataclass(frozen=True)
class LabelMap:
    """Source class name -> label. `labels` is the model's output order."""

    labels: tuple[str, ...]
    classes: dict[str, str]
    path: str = ""

    @classmethod
    def load(cls, path: Path | str) -> "LabelMap":
        raw = read_yaml(path)
        unknown = set(raw) - {"labels", "classes"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s): {_names(unknown)}")
        labels = raw.get("labels")
        classes = raw.get("classes")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"{path}: 'labels' must be a list of at least two label names")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{path}: 'labels' has duplicates")
        if EXCLUDE in labels:
            raise ConfigError(f"{path}: '{EXCLUDE}' is reserved and cannot be a label")
        if not isinstance(classes, dict) or not classes:
            raise ConfigError(f"{path}: 'classes' must map source class names to labels")
        allowed = set(labels) | {EXCLUDE}
        for name, label in classes.items():
            if not isinstance(label, str) or label not in allowed:
                raise ConfigError(
                    f"{path}: class '{_shown(name, text=True)}' maps to '{_shown(label, text=True)}', "
                    f"which is not one of {sorted(allowed)}"
                )
        names = {str(k): v for k, v in classes.items()}
        if len(names) != len(classes):
            raise ConfigError(f"{path}: 'classes' names the same class twice (e.g. 1 and '1')")
        return cls(tuple(labels), names, str(path))

    def label_of(self, original_class: str) -> str:
        try:
            return self.classes[original_class]
        except KeyError:
            raise ConfigError(self.missing_message([original_class])) from None

    def missing_message(self, missing: list[str]) -> str:
        names = ", ".join(f"'{m}'" for m in sorted(missing))
        return (
            f"{self.path or 'label map'}: class {names} not in the label map; "
            f"add it under 'classes' (or map it to '{EXCLUDE}')"
        )


@dataclass(frozen=True)
class GroupRule:
    """How a file's group is found: a regex over its file name, or a manifest column."""

    regex: str | None = r"(\d+)-\d+-\d+"
    column: str | None = None

    def __post_init__(self):
        if (self.regex is None) == (self.column is None):
            raise ConfigError("data.group: set exactly one of 'regex' or 'column'")
        for name in ("regex", "column"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"data.group.{name}: expected a string, got {_shown(getattr(self, name))}")
        if self.regex is not None:
            try:
                compiled = re.compile(self.regex)
            except re.error as exc:
                raise ConfigError(f"data.group.regex: invalid regex {self.regex!r} ({exc})") from None
            if compiled.groups < 1:
                raise ConfigError(f"data.group.regex: {self.regex!r} needs one capture group")

    def group_of(self, file_name: str) -> str | None:
        """Group from a file name (regex rule); None when the regex does not match."""
        match = re.search(self.regex, file_name)
        return match.group(1) if match and match.group(1) else None


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names a DVC stage, a folder and a group prefix


@dataclass(frozen=True)
class DataSource:
    """One image source with its own label map and group rule; `name` prefixes its groups."""

    name: str
    path: str
    label_map: str
    group: GroupRule = field(default_factory=GroupRule)


@dataclass(frozen=True)
class DataConfig:
    """`source`, `label_map`, `group`: the only source, or the first of `sources` (whose label map
    gives the model's labels). `sources`: data.sources, empty in the single-source form."""

    source: str = "../shared/data/herlev"
    label_map: str = "configs/labels/herlev_binary.yaml"
    group: GroupRule = field(default_factory=GroupRule)
    min_side: int = 16
    max_pixels: int = 50_000_000
    sources: tuple[DataSource, ...] = ()

    @property
    def multi_source(self) -> bool:
        return len(self.sources) > 1

    def source_list(self) -> tuple[DataSource, ...]:
        """Every source; one built from source/label_map/group when there is only one."""
        if self.multi_source:
            return self.sources
        name = self.sources[0].name if self.sources else default_source_name(self.source)
        return (DataSource(name, self.source, self.label_map, self.group),)

    @property
    def root(self) -> Path:
        """The folder manifest paths are relative to: the only source's (its folder, or its CSV's
        folder), or with several sources the working folder (the project), which they are joined to."""
        from pipeline.data.manifest import source_root

        return Path(".") if self.multi_source else source_root(self.source)


def default_source_name(path: str) -> str:
    """A source's name when params give none: its folder's name (a CSV's folder for a CSV)."""
    p = Path(path)
    name = (p.parent if p.suffix.lower() == ".csv" else p).resolve().name
    return name if SOURCE_NAME.fullmatch(name or "") else "source"


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 42
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    folds: int = 5

    def __post_init__(self):
        if set(self.fractions) != set(SPLITS):
            raise ConfigError(f"split.fractions: need exactly {', '.join(SPLITS)}; got {', '.join(self.fractions)}")
        # `not 0 < v <= 1` also rejects NaN (which would pass the sum test) and ints too big for a float.
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1
               for v in self.fractions.values()):
            raise ConfigError("split.fractions: every fraction must be a number in (0, 1]")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"split.fractions: must sum to 1 (they sum to {total:g})")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError("split.folds: must be 0 (off) or at least 2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "timm/tf_efficientnet_lite0"
    weights: str | None = "imagenet"  # imagenet (built in) | null (random init) | path to a state dict
    image_size: int = 224
    drop_rate: float = 0.2
    # Start from this cytopipe model's weights instead of `weights`: an MLflow URI
    # (models:/cytology-classifier@champion, models:/NAME/VERSION, runs:/...) or a model folder.
    init_from: str | None = None

    def __post_init__(self):
        if self.image_size < 32:
            raise ConfigError("model.image_size: must be at least 32")


BALANCE = ("class_weights", "sampler", "none")
FIT_ON = ("train", "train+val")
KEEP = ("best", "last")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    epochs: int = 15
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    balance: str = "class_weights"
    augment: str = "train"
    patience: int = 5  # epochs without a better val AUC before stopping (keep: best only)
    # What the model trains on: "train" (val is held out and monitored) or "train+val" (the shipped
    # model: every non-test cell; its calibration then comes from the cv stage's out-of-fold predictions).
    fit_on: str = "train"
    # Which weights are kept: "best" (the epoch with the best val AUC, early stopping after `patience`)
    # or "last" (a fixed schedule; val, if any, is only watched, so it never picks the model).
    keep: str = "best"
    # Lower bound on optimiser steps: a small dataset trains for more epochs instead of too few steps.
    min_steps: int = 0
    # The stem and the first N blocks keep their initial weights and BatchNorm statistics (timm
    # EfficientNet-style backbones). Why: they run at the largest feature maps, so freezing them makes a
    # step cheaper (128 px: 30.4 -> 39.0 img/s with 2 blocks; 160 px: 18.3 -> 30.7), which buys input size.
    freeze_blocks: int = 0
    num_threads: int = 0  # 0: all cores
    num_workers: int = 0
    max_images: int = 0  # 0: all; >0 caps train and val (tiny test configs)
    channels_last: bool = True
    device: str = "auto"

    def __post_init__(self):
        from pipeline.data.transforms import PRESETS

        if self.balance not in BALANCE:
            raise ConfigError(f"train.balance: '{self.balance}' is not one of {', '.join(BALANCE)}")
        if self.augment not in PRESETS:
            raise ConfigError(f"train.augment: '{self.augment}' is not one of {', '.join(PRESETS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:  # NaN lr too
            raise ConfigError("train: epochs, batch_size and lr must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.label_smoothing: must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device: must be auto, cpu or cuda")
        if self.fit_on not in FIT_ON:
            raise ConfigError(f"train.fit_on: must be one of {', '.join(FIT_ON)}, got {_shown(self.fit_on)}")
        if self.keep not in KEEP:
            raise ConfigError(f"train.keep: must be one of {', '.join(KEEP)}, got {_shown(self.keep)}")
        if self.fit_on == "train+val" and self.keep == "best":
            raise ConfigError("train.fit_on: train+val leaves no validation cells to pick the best epoch; "
                              "set train.keep: last")
        if self.freeze_blocks < 0:
            raise ConfigError(f"train.freeze_blocks: must be >= 0, got {self.freeze_blocks}")
        if self.min_steps < 0:
            raise ConfigError(f"train.min_steps: must be >= 0, got {self.min_steps}")


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    experiment: str = "cytology"
    registered_model: str = "cytology-classifier"
    alias: str = "candidate"


@dataclass(frozen=True)
class EvaluateConfig:
    tta: bool = True  # mean logits over the 8 dihedral views
    threshold_rule: str = "sensitivity"  # sensitivity | youden
    target_sensitivity: float = 0.95
    band_width: float = 0.1  # indeterminate band around the threshold, in probability
    positive_labels: list = field(default_factory=lambda: ["malignant"])
    bootstrap: int = 1000
    ece_bins: int = 10

    def __post_init__(self):
        if self.threshold_rule not in ("sensitivity", "youden"):
            raise ConfigError("evaluate.threshold_rule: must be sensitivity or youden")
        if not 0 < self.target_sensitivity <= 1 or not 0 <= self.band_width < 1:
            raise ConfigError("evaluate: target_sensitivity must be in (0, 1] and band_width in [0, 1)")
        if not self.positive_labels or not all(isinstance(x, str) for x in self.positive_labels):
            raise ConfigError("evaluate.positive_labels: a non-empty list of label names")


@dataclass(frozen=True)
class PromotionConfig:
    """The rule for @champion (pipeline/promotion.py): out-of-fold evidence AND the untouched test split."""

    min_oof_auc_ci_low: float = 0.95  # lower 95% group-bootstrap bound of the pooled out-of-fold AUC
    min_auc: float = 0.93  # test AUC
    min_sensitivity: float = 0.90  # test sensitivity at the threshold fitted out of fold
    alias: str = "champion"


@dataclass(frozen=True)
class CvConfig:
    # 0: the train section's schedule (the recipe that ships is the one cross-validated); >0 overrides
    # it, for a quick look only. Folds always keep their last epoch: the held-out fold picks nothing.
    epochs: int = 0

    def __post_init__(self):
        if self.epochs < 0:
            raise ConfigError(f"cv.epochs: must be >= 0, got {self.epochs}")


SCHEDULES = ("parallel", "phased", "overlapped", "sequential")  # pipeline/inference/slide_scoring.py


@dataclass(frozen=True)
class SlideConfig:
    """Whole-slide scoring: foreground mask, cell detection, crop recipe, slide-level rule."""

    mask_max_px: int = 2048  # the foreground mask uses the first level whose long side is <= this
    tile_px: int = 2048  # level-0 region size for detection (plus an overlap of one max cell diameter)
    min_cell_um: float = 5.0  # equivalent diameter limits of a detected cell
    max_cell_um: float = 60.0
    crop_margin: float = 0.25  # crop = bounding box grown by this fraction of its long side on each side
    batch_size: int = 32  # ONNX Runtime here: 188 cells/s at 32, 180 at 16
    top_k: int = 10  # slide summary: mean score of the k most suspicious cells
    min_malignant_cells: int = 3  # slide call: positive when at least this many cells are called malignant
    gallery: int = 24  # default --top: cells shown in the report
    schedule: str = "parallel"  # parallel | phased | overlapped | sequential (pipeline/inference/slide_scoring.py)
    detect_workers: int = 2  # threads that read and detect tiles (and, when overlapped, crop them)
    crop_workers: int = 1  # phased: threads cutting crops ahead of the model (0: in its thread, between batches)
    queue_tiles: int = 4  # bound on tiles waiting for inference (memory stays flat)
    inference_workers: int = 2  # parallel: threads that each crop and score their own tiles
    inference_threads: int = 0  # ONNX Runtime intra-op threads per run (0: the cores / the runs at once)
    max_ood_fraction: float = 0.3  # summary warns when more cells than this are out of domain

    def __post_init__(self):
        for name in ("detect_workers", "queue_tiles", "batch_size", "tile_px", "inference_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slide.{name}: must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"slide.schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.crop_workers < 0:
            raise ConfigError(f"slide.crop_workers: must be >= 0, got {self.crop_workers}")
        if self.inference_threads < 0:
            raise ConfigError(f"slide.inference_threads: must be >= 0 (0: the cores / the runs at once), "
                              f"got {self.inference_threads}")
        if not 0 <= self.max_ood_fraction <= 1:
            raise ConfigError(f"slide.max_ood_fraction: must be in [0, 1], got {self.max_ood_fraction}")
        if not 0 <= self.crop_margin < math.inf:  # a negative margin cuts into the cell; NaN breaks crop_box
            raise ConfigError(f"slide.crop_margin: must be a finite number >= 0, got {self.crop_margin}")

    def model_threads(self) -> int:
        """ONNX Runtime threads per model run: `inference_threads`, else the cores shared out among the
        runs at once (`inference_workers` under the parallel schedule, one otherwise)."""
        if self.inference_threads:
            return self.inference_threads
        runs = self.inference_workers if self.schedule == "parallel" else 1
        return max(1, (os.cpu_count() or 1) // runs)


OOD_METHODS = ("mahalanobis", "knn", "energy")  # pipeline/ood.py


@dataclass(frozen=True)
class OodConfig:
    """The domain-shift guard fitted by the evaluate stage (pipeline/ood.py)."""

    method: str = "mahalanobis"  # chosen by benchmarks/ood_comparison.py (params.yaml has the table)
    pass_rate: float = 0.95  # fraction of validation cells that pass the threshold
    shrinkage: float = 0.1  # mahalanobis: covariance shrinkage towards a scaled identity
    pca_dim: int = 0  # mahalanobis: 0 = full feature space, else the top principal axes
    k: int = 5  # knn: distance to the k-th nearest train cell
    normalize: bool = True  # mahalanobis: on L2-normalised features ("Mahalanobis++"; flat images are caught)

    def __post_init__(self):
        if self.method not in OOD_METHODS:
            raise ConfigError(f"ood.method: must be one of {', '.join(OOD_METHODS)}, got {self.method!r}")
        if not 0 < self.pass_rate <= 1 or not 0 <= self.shrinkage <= 1:
            raise ConfigError("ood: pass_rate must be in (0, 1] and shrinkage in [0, 1]")
        if self.pca_dim < 0 or self.k < 1:
            raise ConfigError("ood: pca_dim must be >= 0 and k >= 1")


@dataclass(frozen=True)
class ExportConfig:
    """The export stage: ONNX file, validation against torch, optional int8."""

    opset: int = 17
    validation_images: int = 64  # real images on which ONNX Runtime must match torch
    tolerance: float = 1e-4  # max |P_onnx - P_torch| allowed
    quantize: bool = True  # also write an int8 model (ONNX Runtime static QDQ) and serve it if it qualifies
    calibration_images: int = 128  # train images that set the int8 activation ranges
    max_auc_drop: float = 0.005  # int8 is served only if its test AUC is at most this much below fp32's

    def __post_init__(self):
        if self.validation_images < 1 or self.calibration_images < 1:
            raise ConfigError("export.validation_images and export.calibration_images: must be >= 1")
        if not self.tolerance > 0:
            raise ConfigError(f"export.tolerance: must be > 0, got {self.tolerance}")


def _in_range(value: Any, where: str):
    """Ints fit in 64 bits: YAML reads integers of any length (float() of one overflows)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise ConfigError(f"{where}: {_shown(value)} is out of range (64-bit integers)")
    return value


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "str | None": (str, type(None)),
          "list": (list,)}


def _from_section(cls, section: dict, where: str):
    """Build a flat dataclass from a params section, checking each value's type."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in section:
            continue
        value = section[f.name]
        allowed = _TYPES[f.type]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise ConfigError(f"{where}.{f.name}: expected {f.type}, got {_shown(value)}")
        _in_range(value, f"{where}.{f.name}")
        kwargs[f.name] = float(value) if f.type == "float" else value
    return cls(**kwargs)


@dataclass(frozen=True)
class Params:
    data: DataConfig
    split: SplitConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    cv: CvConfig = field(default_factory=CvConfig)
    slide: SlideConfig = field(default_factory=SlideConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    path: str = ""

    def to_dict(self) -> dict:
        """The params as params.yaml would hold them (loadable again)."""
        out = asdict(self)
        out.pop("path")
        sources = out["data"].pop("sources")
        if sources:  # the data.sources form replaces source/label_map/group
            for key in ("source", "label_map", "group"):
                out["data"].pop(key)
            out["data"] = {"sources": {s.pop("name"): s for s in sources}, **out["data"]}
        return out


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "mlflow": MlflowConfig, "evaluate": EvaluateConfig,
             "promotion": PromotionConfig, "cv": CvConfig, "slide": SlideConfig, "export": ExportConfig, "ood": OodConfig}


def _typed(value: Any, kind: type, where: str):
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {_shown(value)}")
    return _in_range(value, where)


def _data_sources(data: dict, where: str) -> list[DataSource]:
    """data.sources: {name: {path, label_map, group: {regex | column}}}, in the order given."""
    if "sources" not in data:
        return []
    both = sorted({"source", "label_map", "group"} & set(data))
    if both:
        raise ConfigError(f"{where}: data.sources replaces data.{', data.'.join(both)}: set one form, not both")
    raw = data["sources"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: data.sources must map each source's name to {{path, label_map, group}}")
    sources = []
    for name, spec in raw.items():
        at = f"{where}: data.sources.{_shown(name, text=True)}"
        if not isinstance(name, str) or not SOURCE_NAME.fullmatch(name):
            raise ConfigError(f"{at}: a source name is letters, digits and _ . - (it names a stage and a group prefix)")
        spec = _section(raw, name, {"path", "label_map", "group"}, f"{where}: data.sources")
        rule = _section(spec, "group", {"regex", "column"}, at)
        for key in ("path", "label_map"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise ConfigError(f"{at}.{key}: expected a path, got {_shown(spec.get(key))}")
        try:
            group = GroupRule(regex=rule.get("regex"), column=rule.get("column")) if rule else GroupRule()
        except ConfigError as exc:
            raise ConfigError(f"{at}.{str(exc).removeprefix('data.')}") from None
        sources.append(DataSource(name, spec["path"], spec["label_map"], group))
    return sources


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Load and validate params.yaml."""
    raw = read_yaml(path)
    where = str(path)
    unknown = set(raw) - {"data", "split", *_SECTIONS}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s): {_names(unknown)}")
    data = _section(raw, "data", {"source", "label_map", "group", "sources", "min_side", "max_pixels"}, where)
    group = _section(data, "group", {"regex", "column"}, f"{where}: data")
    sources = _data_sources(data, where)
    split = _section(raw, "split", {"seed", "fractions", "folds"}, where)
    sections = {name: _section(raw, name, {f.name for f in fields(cls)}, where)
                for name, cls in _SECTIONS.items()}
    defaults_d, defaults_s = DataConfig(), SplitConfig()
    try:
        data_cfg = DataConfig(
            source=_typed(data.get("source", defaults_d.source), str, f"{where}: data.source"),
            label_map=_typed(data.get("label_map", defaults_d.label_map), str, f"{where}: data.label_map"),
            group=GroupRule(regex=group.get("regex"), column=group.get("column")) if group else GroupRule(),
            min_side=_typed(data.get("min_side", defaults_d.min_side), int, f"{where}: data.min_side"),
            max_pixels=_typed(data.get("max_pixels", defaults_d.max_pixels), int, f"{where}: data.max_pixels"),
        )
        if sources:
            first = sources[0]
            data_cfg = replace(data_cfg, source=first.path, label_map=first.label_map, group=first.group,
                               sources=tuple(sources))
        fractions = split.get("fractions", defaults_s.fractions)
        if not isinstance(fractions, dict):
            raise ConfigError(f"{where}: split.fractions must be a mapping")
        split_cfg = SplitConfig(
            seed=_typed(split.get("seed", defaults_s.seed), int, f"{where}: split.seed"),
            fractions={str(k): v for k, v in fractions.items()},
            folds=_typed(split.get("folds", defaults_s.folds), int, f"{where}: split.folds"),
        )
        typed = {name: _from_section(cls, sections[name], name) for name, cls in _SECTIONS.items()}
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    return Params(data_cfg, split_cfg, path=where, **typed)
