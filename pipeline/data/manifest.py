"""The manifest: one row per usable image. Column names and reading live here only."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CytopipeError

MANIFEST_COLUMNS = ("path", "sha256", "width", "height", "mode", "original_class", "label", "group")
REJECT_COLUMNS = ("path", "original_class", "reason")
SPLIT_COLUMNS = MANIFEST_COLUMNS + ("split", "fold")

_STRING_COLUMNS = ("path", "sha256", "mode", "original_class", "label", "group", "split")


class ManifestError(CytopipeError, ValueError):
    """A manifest file that is missing or malformed."""


def source_root(source: Path | str) -> Path:
    """The folder that manifest paths are relative to: the source folder, or the CSV's folder."""
    source = Path(source)
    return source.parent if source.suffix.lower() == ".csv" else source


def read_table(path: Path | str, required: tuple[str, ...]):
    """Read a manifest-like CSV with ids kept as strings (group '0012' must stay '0012')."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={c: str for c in _STRING_COLUMNS}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame
