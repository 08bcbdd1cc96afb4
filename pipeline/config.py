"""params.yaml and configs/*.yaml -> typed, validated dataclasses.

The dataclasses below are the schema, and their defaults are params.yaml's values (one set of
defaults: tests/unit/test_config.py holds the two equal). pipeline/typed_yaml.py loads a file into them
by their fields' type hints and limits; each section's `validate()` adds the rules across fields.
Everything is validated once, here, so stages can trust their inputs. Errors name the file and the key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.data.manifest import source_root
from pipeline.data.transforms import PRESETS
from pipeline.typed_yaml import (
    ConfigError,
    Section,
    key_names,
    load_section,
    plain,
    read_document,
    read_yaml,
    setting,
    shown,
)

DEFAULT_PARAMS = Path("params.yaml")
EXCLUDE = "exclude"
SPLITS = ("train", "val", "test")


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
            raise ConfigError(f"{path}: unknown key(s): {key_names(unknown)}")
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
                    f"{path}: class '{shown(name, text=True)}' maps to '{shown(label, text=True)}', "
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


HERLEV_GROUP_REGEX = r"(\d+)-\d+-\d+"  # Herlev file names: <field of view>-<cell>-<n>.jpg


@dataclass(frozen=True)
class GroupRule(Section):
    """How a file's group is found: a regex over its file name (its first capture group), or a CSV
    manifest column. A file sets one of the two; GroupRule() is the Herlev file-name rule."""

    KEY = "group"
    ALTERNATIVES = ("regex", "column")

    regex: str | None = HERLEV_GROUP_REGEX
    column: str | None = None

    def validate(self) -> None:
        if (self.regex is None) == (self.column is None):
            raise self.invalid(None, "set exactly one of 'regex' or 'column'")
        for name in ("regex", "column"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise self.invalid(name, f"expected a string, got {shown(getattr(self, name))}")
        if self.regex is not None:
            try:
                compiled = re.compile(self.regex)
            except re.error as exc:
                raise self.invalid("regex", f"invalid regex {self.regex!r} ({exc})") from None
            if compiled.groups < 1:
                raise self.invalid("regex", f"{self.regex!r} needs one capture group")

    def group_of(self, file_name: str) -> str | None:
        """Group from a file name (regex rule); None when the regex does not match."""
        match = re.search(self.regex, file_name)
        return match.group(1) if match and match.group(1) else None


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names a DVC stage, a folder and a group prefix


@dataclass(frozen=True)
class DataSource(Section):
    """One image source: a folder of class subfolders or a CSV manifest (columns path,class[,group]),
    with its own label map and group rule; `name` (its key in data.sources) prefixes its groups.
    `group` None: a CSV manifest's `group` column when it has one, else GroupRule(); ingest decides,
    as it reads the CSV. A source never takes another source's rule."""

    KEY = "source"

    name: str = setting(from_key=True)
    path: str
    label_map: str
    group: GroupRule | None = None

    def validate(self) -> None:
        if not isinstance(self.name, str) or not SOURCE_NAME.fullmatch(self.name):
            raise self.invalid(None, "a source name is letters, digits and _ . - (it names a stage and a group prefix)")
        for key in ("path", "label_map"):
            if not getattr(self, key):
                raise self.invalid(key, f"expected a path, got {shown(getattr(self, key))}")


def _herlev_sources() -> dict[str, DataSource]:
    return {
        "herlev": DataSource(
            "herlev", "../shared/data/herlev", "configs/labels/herlev_binary.yaml", GroupRule(regex=HERLEV_GROUP_REGEX)
        )
    }


_SOURCES_FORM = (
    "data.sources replaces data.source, data.label_map and data.group: "
    "write {name: {path, label_map, group}} for each source"
)


@dataclass(frozen=True)
class DataConfig(Section):
    """`sources`: name -> DataSource, in order; the first one's label map gives the model's labels."""

    KEY = "data"
    RETIRED_KEYS = {"source": _SOURCES_FORM, "label_map": _SOURCES_FORM, "group": _SOURCES_FORM}

    sources: dict[str, DataSource] = setting(factory=_herlev_sources)
    min_side: int = 16
    max_pixels: int = 50_000_000

    def validate(self) -> None:
        if not self.sources:
            raise self.invalid("sources", "needs at least one source: {name: {path, label_map, group}}")
        for name, src in self.sources.items():
            if src.name != name:
                raise self.invalid(f"sources.{name}", f"holds the source named {src.name!r}")

    @property
    def first_source(self) -> DataSource:
        return next(iter(self.sources.values()))

    @property
    def source(self) -> str:
        """The first source's path."""
        return self.first_source.path

    @property
    def label_map(self) -> str:
        """The first source's label map: it gives the model's labels (every source's must agree)."""
        return self.first_source.label_map

    @property
    def group(self) -> GroupRule | None:
        """The first source's group rule (None: decided by ingest, see DataSource)."""
        return self.first_source.group

    @property
    def multi_source(self) -> bool:
        return len(self.sources) > 1

    def source_list(self) -> tuple[DataSource, ...]:
        return tuple(self.sources.values())

    @property
    def root(self) -> Path:
        """The folder manifest paths are relative to: the only source's (its folder, or its CSV's
        folder), or with several sources the working folder (the project), which they are joined to."""
        return Path(".") if self.multi_source else source_root(self.source)


def default_source_name(path: str) -> str:
    """A source's name when none is given (`cytopipe ingest --source`): its folder's name (a CSV's
    folder for a CSV)."""
    p = Path(path)
    name = (p.parent if p.suffix.lower() == ".csv" else p).resolve().name
    return name if SOURCE_NAME.fullmatch(name or "") else "source"


@dataclass(frozen=True)
class SplitConfig(Section):
    KEY = "split"

    seed: int = 42
    fractions: dict[str, float] = setting(factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    folds: int = 5  # grouped, stratified k-fold over train+val for cross-validation (0: off)

    def validate(self) -> None:
        if set(self.fractions) != set(SPLITS):
            raise self.invalid("fractions", f"need exactly {', '.join(SPLITS)}; got {key_names(self.fractions)}")
        # `not 0 < v <= 1` also rejects NaN (which would pass the sum test) and ints too big for a float.
        if any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in self.fractions.values()
        ):
            raise self.invalid("fractions", "every fraction must be a number in (0, 1]")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise self.invalid("fractions", f"must sum to 1 (they sum to {total:g})")
        if self.folds == 1 or self.folds < 0:
            raise self.invalid("folds", "must be 0 (off) or at least 2")


@dataclass(frozen=True)
class ModelConfig(Section):
    KEY = "model"

    arch: str = "timm/tf_efficientnet_lite0"
    weights: str | None = "imagenet"  # imagenet (built in) | null (random init) | path to a state dict
    image_size: int = setting(128, ge=32)
    drop_rate: float = 0.2
    # Start from this cytopipe model's weights instead of `weights`: an MLflow URI
    # (models:/cytology-classifier@champion, models:/NAME/VERSION, runs:/...) or a model folder.
    init_from: str | None = None


BALANCE = ("class_weights", "sampler", "none")
FIT_ON = ("train", "train+val")
KEEP = ("best", "last")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig(Section):
    KEY = "train"

    seed: int = 42
    epochs: int = setting(8, ge=1)
    batch_size: int = setting(32, ge=1)
    lr: float = setting(1e-3, gt=0)
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = setting(0.1, ge=0, lt=1)
    balance: str = setting("class_weights", choices=BALANCE)
    augment: str = "train"  # an albumentations preset of pipeline/data/transforms.py
    patience: int = 5  # epochs without a better val AUC before stopping (keep: best only)
    # What the model trains on: "train" (val is held out and monitored) or "train+val" (the shipped
    # model: every non-test cell; its calibration then comes from the cv stage's out-of-fold predictions).
    fit_on: str = setting("train+val", choices=FIT_ON)
    # Which weights are kept: "best" (the epoch with the best val AUC, early stopping after `patience`)
    # or "last" (a fixed schedule; val, if any, is only watched, so it never picks the model).
    keep: str = setting("last", choices=KEEP)
    # Lower bound on optimiser steps: a small dataset trains for more epochs instead of too few steps.
    min_steps: int = setting(120, ge=0)
    # The stem and the first N blocks keep their initial weights and BatchNorm statistics (timm
    # EfficientNet-style backbones). Why: they run at the largest feature maps, so freezing them makes a
    # step cheaper (128 px: 30.4 -> 39.0 img/s with 2 blocks; 160 px: 18.3 -> 30.7), which buys input size.
    freeze_blocks: int = setting(2, ge=0)
    num_threads: int = 0  # 0: all cores
    num_workers: int = 0
    max_images: int = 0  # 0: all; >0 caps train and val (tiny test configs)
    channels_last: bool = True
    device: str = setting("auto", choices=DEVICES)

    def validate(self) -> None:
        if self.augment not in PRESETS:
            raise self.invalid("augment", f"must be one of {', '.join(PRESETS)}, got {shown(self.augment)}")
        if self.fit_on == "train+val" and self.keep == "best":
            raise self.invalid(
                "fit_on", "train+val leaves no validation cells to pick the best epoch; set train.keep: last"
            )


@dataclass(frozen=True)
class MlflowConfig(Section):
    KEY = "mlflow"

    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    experiment: str = "cytology"
    registered_model: str = "cytology-classifier"
    alias: str = "candidate"


THRESHOLD_RULES = ("sensitivity", "youden")


@dataclass(frozen=True)
class EvaluateConfig(Section):
    KEY = "evaluate"

    tta: bool = False  # mean logits over the 8 dihedral views (params.yaml says why it is off)
    threshold_rule: str = setting("sensitivity", choices=THRESHOLD_RULES)
    target_sensitivity: float = setting(0.95, gt=0, le=1)
    band_width: float = setting(0.1, ge=0, lt=1)  # indeterminate band around the threshold, in probability
    positive_labels: list[str] = setting(factory=lambda: ["malignant"])
    bootstrap: int = 1000
    ece_bins: int = 10

    def validate(self) -> None:
        if not self.positive_labels or not all(isinstance(x, str) for x in self.positive_labels):
            raise self.invalid("positive_labels", "a non-empty list of label names")


@dataclass(frozen=True)
class PromotionConfig(Section):
    """The rule for @champion (pipeline/promotion.py): out-of-fold evidence AND the untouched test split."""

    KEY = "promotion"

    min_oof_auc_ci_low: float = 0.95  # lower 95% group-bootstrap bound of the pooled out-of-fold AUC
    min_auc: float = 0.93  # test AUC
    min_sensitivity: float = 0.90  # test sensitivity at the threshold fitted out of fold
    alias: str = "champion"


@dataclass(frozen=True)
class CvConfig(Section):
    KEY = "cv"

    # 0: the train section's schedule (the recipe that ships is the one cross-validated); >0 overrides
    # it, for a quick look only. Folds always keep their last epoch: the held-out fold picks nothing.
    epochs: int = setting(0, ge=0)


@dataclass(frozen=True)
class SlideConfig(Section):
    """Whole-slide scoring: foreground mask, cell detection, crop recipe, slide-level rule."""

    KEY = "slide"
    RETIRED_KEYS = {
        key: "one schedule ships (detect, then inference_workers threads each crop and score their "
        "tiles); the alternatives are measured by benchmarks/slide_schedules.py"
        for key in ("schedule", "crop_workers")
    }

    mask_max_px: int = 2048  # the foreground mask uses the first level whose long side is <= this
    tile_px: int = setting(2048, ge=1)  # level-0 region size for detection (plus an overlap of one max cell)
    min_cell_um: float = 5.0  # equivalent diameter limits of a detected cell
    max_cell_um: float = 60.0
    # crop = bounding box grown by this fraction of its long side on each side; a negative margin cuts
    # into the cell, and NaN or inf break crop_box.
    crop_margin: float = setting(0.25, ge=0, lt=math.inf)
    batch_size: int = setting(32, ge=1)  # ONNX Runtime here: 188 cells/s at 32, 180 at 16
    top_k: int = 10  # slide summary: mean score of the k most suspicious cells
    min_malignant_cells: int = 3  # slide call: positive when at least this many cells are called malignant
    gallery: int = 24  # default --top: cells shown in the report
    detect_workers: int = setting(2, ge=1)  # threads that read and detect tiles
    queue_tiles: int = setting(4, ge=1)  # bound on tiles waiting for inference (memory stays flat)
    inference_workers: int = setting(2, ge=1)  # threads that each crop and score their own tiles
    inference_threads: int = setting(0, ge=0)  # ONNX Runtime intra-op threads per run (0: the cores / the runs)
    max_ood_fraction: float = setting(0.3, ge=0, le=1)  # summary warns when more cells than this are out of domain

    def model_threads(self) -> int:
        """ONNX Runtime threads per model run: `inference_threads`, else the cores shared out among the
        `inference_workers` runs at once."""
        if self.inference_threads:
            return self.inference_threads
        return max(1, (os.cpu_count() or 1) // self.inference_workers)


OOD_METHODS = ("mahalanobis", "knn", "energy")  # pipeline/ood.py


@dataclass(frozen=True)
class OodConfig(Section):
    """The domain-shift guard fitted by the evaluate stage (pipeline/ood.py)."""

    KEY = "ood"

    method: str = setting("mahalanobis", choices=OOD_METHODS)  # chosen by benchmarks/ood_comparison.py
    pass_rate: float = setting(0.95, gt=0, le=1)  # fraction of validation cells that pass the threshold
    shrinkage: float = setting(0.1, ge=0, le=1)  # mahalanobis: covariance shrinkage towards a scaled identity
    pca_dim: int = setting(0, ge=0)  # mahalanobis: 0 = full feature space, else the top principal axes
    k: int = setting(5, ge=1)  # knn: distance to the k-th nearest train cell
    normalize: bool = True  # mahalanobis: on L2-normalised features ("Mahalanobis++"; flat images are caught)


@dataclass(frozen=True)
class ExportConfig(Section):
    """The export stage: ONNX file, validation against torch, optional int8."""

    KEY = "export"

    opset: int = 17
    validation_images: int = setting(64, ge=1)  # real images on which ONNX Runtime must match torch
    tolerance: float = setting(1e-4, gt=0)  # max |P_onnx - P_torch| allowed
    # Also write an int8 model (ONNX Runtime static QDQ) and serve it if it qualifies; params.yaml says
    # why it is off.
    quantize: bool = False
    calibration_images: int = setting(128, ge=1)  # train images that set the int8 activation ranges
    max_auc_drop: float = 0.005  # int8 is served only if its test AUC is at most this much below fp32's


@dataclass(frozen=True)
class MorphometryConfig(Section):
    """Nuclear morphometry of every cell and the atypia score (pipeline/morphometry/)."""

    KEY = "morphometry"

    size: int = setting(128, ge=32)  # px: plain images are segmented at this size (long side)
    slide_size: int = setting(64, ge=32)  # px: each slide cell's window of its crop is segmented at this size
    background_od: float = setting(0.1, ge=0)  # plain images: summed OD above the glass that makes a pixel cell
    glass_od: float = setting(0.25, ge=0)  # plain images: the brightest 2% are glass when their OD is at most this
    min_nucleus_contrast: float = setting(0.04, ge=0)  # haematoxylin OD across the nucleus edge, inside minus outside
    min_nucleus_od: float = setting(0.3, ge=0)  # haematoxylin OD of a nucleus with almost no cytoplasm
    min_nucleus_px: int = setting(12, ge=1)  # at `size`: a smaller dark spot is not a nucleus
    max_nucleus_cut: float = setting(0.35, ge=0, le=1)  # share of the outline on the crop edge; more: not measured
    atypia: str = setting("criteria", choices=("criteria", "logistic"))  # the score reports and calls use
    nc_threshold: float = setting(0.5, gt=0, le=1)  # atypia burden: N/C ratio at least this...
    min_nucleus_um: float = setting(10.0, ge=0)  # ...and a nuclear diameter at least this (µm)
    gallery: int = setting(24, ge=0)  # report: the most atypical cells shown (over all cells)


@dataclass(frozen=True)
class Params(Section):
    """A whole params file; `path` is the file it was loaded from."""

    data: DataConfig = setting(factory=DataConfig)
    split: SplitConfig = setting(factory=SplitConfig)
    model: ModelConfig = setting(factory=ModelConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    mlflow: MlflowConfig = setting(factory=MlflowConfig)
    evaluate: EvaluateConfig = setting(factory=EvaluateConfig)
    promotion: PromotionConfig = setting(factory=PromotionConfig)
    cv: CvConfig = setting(factory=CvConfig)
    slide: SlideConfig = setting(factory=SlideConfig)
    export: ExportConfig = setting(factory=ExportConfig)
    ood: OodConfig = setting(factory=OodConfig)
    morphometry: MorphometryConfig = setting(factory=MorphometryConfig)
    path: str = setting("", internal=True)

    def to_dict(self) -> dict:
        """The params as a params file would hold them, every key written (loadable again)."""
        return plain(self)


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Load and validate a params file. One holding `extends: BASE` is an overlay on BASE (a path
    relative to the overlay's folder): it changes only the keys it names (pipeline/typed_yaml.py,
    read_document); configs/tiny.yaml is one, on params.yaml."""
    params = load_section(Params, read_document(path, Params), str(path))
    return replace(params, path=str(path))
