"""YAML documents -> nested frozen dataclasses, driven by the dataclasses' own fields and type hints.

One generic loader instead of a parser per section. A field's type hint says what the YAML value must
be: int, float, str, bool, `X | None`, `list[X]`, `tuple[X, ...]`, `dict[str, X]` or a nested
dataclass; an absent key takes the field's default. `setting(...)` adds limits (ge/gt/le/lt, choices)
that `Section` checks however the object is built (from a file, in code, by `replace`), and a
section's `validate()` holds the rules that span fields. Every error is a `ConfigError` of one line
naming the file and the dotted key (`params.yaml: train.epochs: must be >= 1, got 0`).

A document may be an overlay on another: see `read_document`.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from pipeline.errors import CytopipeError

T = TypeVar("T")
EXTENDS = "extends"  # an overlay's key naming the document it changes

# What str.splitlines() breaks on: a key or value holding one must not break the message.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class ConfigError(CytopipeError, ValueError):
    """A configuration problem, reported as one line. `key` and `reason` are set when a section refuses
    one of its own values (`Section.invalid`): the message then names the key from the section's usual
    place (`train.epochs`), and the loader says it again from where the file put it."""

    def __init__(self, message: object = "", key: str | None = None, reason: str | None = None):
        # Line breaks inside names taken from the file are shown escaped, as repr() would.
        super().__init__(str(message).translate(_LINE_BREAKS))
        self.key, self.reason = key, reason

    def at(self, where: str) -> str:
        """The message for the section found at dotted place `where`."""
        return f"{dotted(where, self.key)}: {self.reason}" if self.reason is not None else f"{where}: {self}"


def dotted(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def shown(value: object, text: bool = False) -> str:
    """repr() (str() if `text`) for a message, short, and safe for ints too long to print
    (YAML reads 0xfff... of any length; str() of an int over 4300 digits raises)."""
    try:
        out = str(value) if text else repr(value)
    except ValueError:
        out = f"<int of {value.bit_length()} bits>"
    return out if len(out) <= 80 else out[:77] + "..."


def key_names(keys) -> str:
    """Keys for a message: YAML keys may be ints, bools, null... as well as strings."""
    return ", ".join(sorted({shown(k, text=True) for k in keys}))


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
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


# --------------------------------------------------------------------------- declaring fields


def setting(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    from_key: bool = False,
    internal: bool = False,
) -> Any:
    """A dataclass field with limits. `from_key`: filled from the object's key in the mapping that holds
    it (dict[str, X]), never written inside it. `internal`: not a key of the file at all."""
    limits = {
        name: value
        for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices))
        if value is not None
    }
    return field(
        default=default,
        default_factory=factory,
        metadata={"limits": limits, "from_key": from_key, "internal": internal},
    )


def _range_text(limits: dict) -> str:
    low = [f"{op} {limits[name]}" for name, op in (("ge", ">="), ("gt", ">")) if name in limits]
    high = [f"{op} {limits[name]}" for name, op in (("le", "<="), ("lt", "<")) if name in limits]
    if low and high:
        left = "[" if "ge" in limits else "("
        right = "]" if "le" in limits else ")"
        return f"in {left}{limits.get('ge', limits.get('gt'))}, {limits.get('le', limits.get('lt'))}{right}"
    return (low or high)[0]


def _limit_problem(value: Any, limits: dict) -> str | None:
    """Why `value` breaks `limits`, or None. Comparisons are written so that NaN fails every bound."""
    if value is None or not limits:
        return None
    if "choices" in limits:
        choices = limits["choices"]
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}, got {shown(value)}"
    try:
        within = (
            ("ge" not in limits or value >= limits["ge"])
            and ("gt" not in limits or value > limits["gt"])
            and ("le" not in limits or value <= limits["le"])
            and ("lt" not in limits or value < limits["lt"])
        )
    except TypeError:
        return f"expected a number, got {shown(value)}"
    return None if within else f"must be {_range_text(limits)}, got {shown(value)}"


class Section:
    """Base of a config dataclass. `KEY`: its usual dotted place, for messages when it is built in code.
    `ALTERNATIVES`: fields of which a file sets one (the others are then None, not their defaults).
    `RETIRED_KEYS`: keys a file may still hold from an older form -> what to write instead."""

    KEY: ClassVar[str] = ""
    ALTERNATIVES: ClassVar[tuple[str, ...]] = ()
    RETIRED_KEYS: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _limit_problem(getattr(self, f.name), f.metadata.get("limits", {}))
            if problem:
                raise self.invalid(f.name, problem)
        self.validate()

    def validate(self) -> None:
        """Rules across fields; a section that has any raises `self.invalid(...)`."""

    def invalid(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{dotted(self.KEY, key)}: {message}", key, message)


# --------------------------------------------------------------------------- loading


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _settable(cls: type) -> dict[str, Field]:
    """The fields a file sets, by name."""
    return {f.name: f for f in fields(cls) if not f.metadata.get("from_key") and not f.metadata.get("internal")}


def type_name(hint: Any) -> str:
    """A type hint as a message says it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {type_name(args[0])}"
    if origin is dict or is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def load_section(cls: type[T], raw: Any, file: str, where: str = "", key: str | None = None) -> T:
    """`raw` (a mapping from the YAML file `file`, at dotted place `where`) as a `cls`; `key`: its key in
    the mapping that holds it. Absent keys take their defaults; a null section is all defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: {where}: expected a mapping, got {shown(raw)}")
    settable = _settable(cls)
    _check_keys(cls, raw, settable, file, where)
    hints = _hints(cls)
    values = {name: convert(raw[name], hints[name], file, dotted(where, name)) for name in settable if name in raw}
    if any(name in raw for name in cls.ALTERNATIVES):
        values.update({name: None for name in cls.ALTERNATIVES if name not in raw})
    values.update({f.name: key for f in fields(cls) if f.metadata.get("from_key")})
    try:
        return cls(**values)
    except ConfigError as exc:  # the section's own checks: nested sections were built above
        raise ConfigError(f"{file}: {exc.at(where or 'top level')}") from None


def _check_keys(cls: type, raw: dict, settable: dict[str, Field], file: str, where: str) -> None:
    unknown = [k for k in raw if k not in settable]
    for k in unknown:
        if isinstance(k, str) and k in cls.RETIRED_KEYS:
            raise ConfigError(f"{file}: {dotted(where, k)}: no longer read; {cls.RETIRED_KEYS[k]}")
    if unknown:
        what = f"unknown key(s) in '{where}'" if where else "unknown section(s)"
        raise ConfigError(f"{file}: {what}: {key_names(unknown)} (known: {', '.join(settable)})")
    missing = [
        name
        for name, f in settable.items()
        if name not in raw and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{file}: {where or 'top level'}: missing key(s): {', '.join(missing)}")


def convert(value: Any, hint: Any, file: str, where: str) -> Any:
    """A YAML value as the type hint `hint` wants it, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: the only union config classes use
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        if not _fits(value, inner):
            raise ConfigError(f"{file}: {where}: expected {type_name(hint)}, got {shown(value)}")
        return convert(value, inner, file, where)
    if is_dataclass(hint):
        return load_section(hint, value, file, where)
    if origin is dict:
        return _convert_mapping(value, hint, file, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {where}: expected {type_name(hint)}, got {shown(value)}")
        items = [convert(v, args[0], file, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _convert_scalar(value, hint, file, where)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is the YAML kind `hint` reads (a mapping, a list, or the scalar type)."""
    if is_dataclass(hint) or typing.get_origin(hint) is dict:
        return isinstance(value, dict)
    if typing.get_origin(hint) in (list, tuple):
        return isinstance(value, list)
    return _scalar_ok(value, hint)


def _convert_mapping(value: Any, hint: Any, file: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: {where}: expected {type_name(hint)}, got {shown(value)}")
    key_type, item = typing.get_args(hint)
    out = {}
    for k, v in value.items():
        if not isinstance(k, key_type):
            raise ConfigError(f"{file}: {where}: keys must be {type_name(key_type)}, got {shown(k)}")
        at = f"{where}.{k}"
        out[k] = load_section(item, v, file, at, key=k) if is_dataclass(item) else convert(v, item, file, at)
    return out


def _scalar_ok(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # YAML's true is not a number
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _convert_scalar(value: Any, kind: Any, file: str, where: str) -> Any:
    if kind not in (int, float, str, bool):
        raise TypeError(f"{where}: type hint {kind!r} is not one the config loader reads")  # a bug in a class
    if not _scalar_ok(value, kind):
        raise ConfigError(f"{file}: {where}: expected {type_name(kind)}, got {shown(value)}")
    # YAML reads integers of any length; 64 bits is plenty and float() of a longer one overflows.
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{file}: {where}: {shown(value)} is out of range (64-bit integers)")
    return float(value) if kind is float else value


def plain(obj: Any) -> Any:
    """A config object as YAML would hold it (loadable again): dataclasses become mappings of their
    file keys, tuples become lists; everything is a fresh copy."""
    if is_dataclass(obj):
        return {name: plain(getattr(obj, name)) for name in _settable(type(obj))}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- overlays


def read_document(path: Path | str, cls: type, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping at `path`, for `cls`, with its overlay resolved.

    A document holding `extends: BASE` is an overlay: BASE is a path relative to the overlay's own
    folder (so the pair can move together), must be valid on its own (checked first, so its errors
    name it), and may itself extend another. The overlay's sections change only the keys they name;
    each key's value replaces the base's whole, lists and mappings included (data.sources,
    split.fractions): merging stops at the sections, the dataclass-typed fields."""
    path = Path(path)
    doc = read_yaml(path)
    if EXTENDS not in doc:
        return doc
    name = doc.pop(EXTENDS)
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{path}: {EXTENDS}: expected the path of the file this one changes "
            f"(relative to this file's folder), got {shown(name)}"
        )
    base_path = path.parent / name
    seen = _seen + (path.resolve(),)
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: {EXTENDS}: {name} leads back to {base_path} (a cycle)")
    try:
        base = read_document(base_path, cls, seen)
        load_section(cls, base, str(base_path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {EXTENDS}: {exc}") from None
    return overlay(base, doc, cls)


def overlay(base: dict, changes: dict, cls: type) -> dict:
    """`changes` on `base` (see `read_document`); neither is modified."""
    merged = dict(base)
    hints = _hints(cls)
    for key, value in changes.items():
        kind = hints.get(key) if isinstance(key, str) and key in _settable(cls) else None
        if is_dataclass(kind) and isinstance(merged.get(key), dict) and isinstance(value, (dict, type(None))):
            merged[key] = overlay(merged[key], value or {}, kind)  # an empty section changes nothing
        else:
            merged[key] = value
    return merged
