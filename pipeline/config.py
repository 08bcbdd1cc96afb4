"""params.yaml and configs/*.yaml -> typed, validated dataclasses.

Everything is validated once, here, so stages can trust their inputs. Errors name
the file and the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")
EXCLUDE = "exclude"
SPLITS = ("train", "val", "test")


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
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
        raise ConfigError(f"{where}: unknown key(s) in '{key}': {', '.join(sorted(unknown))}")
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
            raise ConfigError(f"{path}: unknown key(s): {', '.join(sorted(unknown))}")
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
            if label not in allowed:
                raise ConfigError(
                    f"{path}: class '{name}' maps to '{label}', which is not one of {sorted(allowed)}"
                )
        return cls(tuple(labels), {str(k): str(v) for k, v in classes.items()}, str(path))

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


@dataclass(frozen=True)
class DataConfig:
    source: str = "../shared/data/herlev"
    label_map: str = "configs/labels/herlev_binary.yaml"
    group: GroupRule = field(default_factory=GroupRule)
    min_side: int = 16
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 42
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    folds: int = 5

    def __post_init__(self):
        if set(self.fractions) != set(SPLITS):
            raise ConfigError(f"split.fractions: need exactly {', '.join(SPLITS)}; got {', '.join(self.fractions)}")
        if any(not isinstance(v, (int, float)) or v <= 0 for v in self.fractions.values()):
            raise ConfigError("split.fractions: every fraction must be a number > 0")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"split.fractions: must sum to 1 (they sum to {total:g})")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError("split.folds: must be 0 (off) or at least 2")


@dataclass(frozen=True)
class Params:
    data: DataConfig
    split: SplitConfig
    path: str = ""


def _typed(value: Any, kind: type, where: str):
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Load and validate params.yaml (unknown sections are left for later stages)."""
    raw = read_yaml(path)
    where = str(path)
    data = _section(raw, "data", {"source", "label_map", "group", "min_side", "max_pixels"}, where)
    group = _section(data, "group", {"regex", "column"}, f"{where}: data")
    split = _section(raw, "split", {"seed", "fractions", "folds"}, where)
    defaults_d, defaults_s = DataConfig(), SplitConfig()
    try:
        data_cfg = DataConfig(
            source=_typed(data.get("source", defaults_d.source), str, f"{where}: data.source"),
            label_map=_typed(data.get("label_map", defaults_d.label_map), str, f"{where}: data.label_map"),
            group=GroupRule(regex=group.get("regex"), column=group.get("column")) if group else GroupRule(),
            min_side=_typed(data.get("min_side", defaults_d.min_side), int, f"{where}: data.min_side"),
            max_pixels=_typed(data.get("max_pixels", defaults_d.max_pixels), int, f"{where}: data.max_pixels"),
        )
        fractions = split.get("fractions", defaults_s.fractions)
        if not isinstance(fractions, dict):
            raise ConfigError(f"{where}: split.fractions must be a mapping")
        split_cfg = SplitConfig(
            seed=_typed(split.get("seed", defaults_s.seed), int, f"{where}: split.seed"),
            fractions={str(k): v for k, v in fractions.items()},
            folds=_typed(split.get("folds", defaults_s.folds), int, f"{where}: split.folds"),
        )
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    return Params(data_cfg, split_cfg, where)
