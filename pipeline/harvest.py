"""Harvest: a pathologist's labels on a scored slide -> a class-folder training dataset.

Each labelled cell is cut from the slide with exactly the crop recipe scoring uses
(`crop_box` + `slide.crop_margin`, pipeline/wsi/crops.py), so a retrained model sees
the cells as it will meet them. The dataset is

    DIR/<label>/<slide id>-<cell id>.png      lossless crops
    DIR/manifest.csv                          path,class,group (+ provenance), which `ingest` reads
                                              with `data.group.column: group`

Several slides merge into one DIR; harvesting a slide again replaces that slide's cells.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline import atomic, qupath
from pipeline.errors import CytopipeError
from pipeline.wsi.crops import read_crops
from pipeline.wsi.readers import open_slide

LABELS = ("malignant", "benign", "unsure", "not_a_cell")  # the report's buttons
LABEL_COLUMNS = ("cell_id", "x", "y", "label")  # of the report's export; reviewer, timestamp, slide optional
CELL_COLUMNS = ("cell_id", "x", "y", "x0", "y0", "x1", "y1")  # of score-slide's cells.csv
MANIFEST_COLUMNS = ("path", "class", "group", "slide", "cell_id", "x", "y", "reviewer", "timestamp", "sha256")
MANIFEST = "manifest.csv"
XY_TOLERANCE = 1.0  # px: the export may round the centroid


class HarvestError(CytopipeError, RuntimeError):
    """Harvest cannot proceed (bad input file, unknown label, bad slide id)."""


@dataclass
class Harvest:
    """One slide's harvest: manifest rows, their PNG bytes (same order), skipped label rows."""

    slide_id: str
    rows: list[dict] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise HarvestError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HarvestError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise HarvestError(f"{path}: not {what}: missing column(s) {', '.join(missing)}")
    return frame


def _number(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def slide_id_of(slide: Path | str, slide_id: str | None = None) -> str:
    """The slide's id in file names and groups: `slide_id` or the slide file's stem."""
    sid = Path(slide).stem if slide_id is None else slide_id
    # It becomes part of a file name: no separators, nothing hidden.
    if not sid or sid.startswith(".") or not re.fullmatch(r"[\w.+-]+", sid):
        raise HarvestError(f"slide id {sid!r}: use letters, digits and . _ + - only (pass --slide-id)")
    return sid


def match_labels(labels: pd.DataFrame, cells: pd.DataFrame, labels_path: Path | str) -> tuple[pd.DataFrame, list[str]]:
    """Label rows joined to their cells (one per cell_id, the last label wins) and one message per
    skipped row. An unknown label stops the harvest: it means a wrong file, not a wrong cell."""
    by_id = {str(r.cell_id): r for r in cells.itertuples(index=False)}
    kept: dict[str, dict] = {}
    skipped = []
    # A CSV row is named by its line (1 is the header); a GeoJSON reader names its features in attrs.
    places = labels.attrs.get("where") or [f"{labels_path}: line {n}" for n in range(2, len(labels) + 2)]
    for where, row in zip(places, labels.to_dict("records")):
        if row["label"] not in LABELS:
            raise HarvestError(f"{where}: label {row['label']!r} is not one of {', '.join(LABELS)}")
        cell = by_id.get(str(row["cell_id"]))
        if cell is None:
            skipped.append(f"{where}: cell_id {row['cell_id']!r} is not in cells.csv; skipped")
            continue
        x, y = _number(row["x"]), _number(row["y"])
        if x is None or y is None or abs(x - float(cell.x)) > XY_TOLERANCE or abs(y - float(cell.y)) > XY_TOLERANCE:
            skipped.append(
                f"{where}: cell {row['cell_id']} is at ({row['x']}, {row['y']}) here but at "
                f"({cell.x}, {cell.y}) in cells.csv (another slide's labels?); skipped"
            )
            continue
        if row["cell_id"] in kept:
            skipped.append(f"{where}: cell {row['cell_id']} labelled again; this later label is used")
        kept[row["cell_id"]] = {**row, **{k: getattr(cell, k) for k in CELL_COLUMNS}}
    columns = list(labels.columns) + [c for c in CELL_COLUMNS if c not in labels.columns]
    return pd.DataFrame(list(kept.values()), columns=columns), skipped


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def harvest(
    slide: Path | str,
    cells: pd.DataFrame,
    labels: pd.DataFrame,
    margin: float,
    slide_id: str,
    labels_path: Path | str = "labels.csv",
) -> Harvest:
    """Cut every labelled cell from `slide` as scoring does and encode it as PNG (pure: writes nothing)."""

    matched, skipped = match_labels(labels, cells, labels_path)
    out = Harvest(slide_id, skipped=skipped)
    if matched.empty:
        return out
    with open_slide(slide, mpp=1.0) as source:  # crops are in pixels: a slide without mpp is fine
        crops = read_crops(source, matched, margin)
    for row, crop in zip(matched.to_dict("records"), crops):
        png = _png(crop)
        out.pngs.append(png)
        out.rows.append(
            {
                "path": f"{row['label']}/{slide_id}-{row['cell_id']}.png",
                "class": row["label"],
                "group": slide_id,
                "slide": slide_id,
                "cell_id": row["cell_id"],
                "x": row["x"],
                "y": row["y"],
                "reviewer": row.get("reviewer", ""),
                "timestamp": row.get("timestamp", ""),
                "sha256": hashlib.sha256(png).hexdigest(),
            }
        )
    return out


def merged_manifest(existing: pd.DataFrame | None, result: Harvest) -> pd.DataFrame:
    """Existing rows of other slides plus this slide's new rows (rerunning a slide replaces it)."""
    new = pd.DataFrame(result.rows, columns=list(MANIFEST_COLUMNS))
    if existing is None or existing.empty:
        return new
    others = existing[existing["slide"] != result.slide_id]
    return pd.concat([others, new], ignore_index=True).sort_values(["slide", "path"], kind="stable", ignore_index=True)


def read_manifest(out_dir: Path) -> pd.DataFrame | None:
    path = Path(out_dir) / MANIFEST
    return _read_csv(path, MANIFEST_COLUMNS, "a harvest manifest") if path.exists() else None


def write_harvest(out_dir: Path | str, result: Harvest) -> pd.DataFrame:
    """Write the crops, drop this slide's crops a previous run left that are no longer labelled,
    then replace manifest.csv: every file is written atomically and the manifest last, so it
    never names a file that is not complete."""

    out_dir = Path(out_dir)
    existing = read_manifest(out_dir)
    manifest = merged_manifest(existing, result)
    for row, png in zip(result.rows, result.pngs):
        with atomic.atomic_path(out_dir / row["path"]) as tmp:
            tmp.write_bytes(png)
    atomic.write_csv(out_dir / MANIFEST, manifest)
    if existing is not None:
        stale = set(existing.loc[existing["slide"] == result.slide_id, "path"]) - set(manifest["path"])
        for rel in sorted(stale):
            (out_dir / rel).unlink(missing_ok=True)
    return manifest


GEOJSON_SUFFIXES = (".geojson", ".json")  # a review exported from QuPath (pipeline/qupath.py)


def read_labels(labels_path: Path | str, cells: pd.DataFrame, class_map_path: Path | str | None = None):
    """The labels table and the reasons for skipped entries: the report's CSV export, or a GeoJSON
    exported from QuPath whose classifications map to labels through `class_map_path`
    (default configs/labels/qupath_review.yaml)."""
    path = Path(labels_path)
    if path.suffix.lower() not in GEOJSON_SUFFIXES:
        return _read_csv(path, LABEL_COLUMNS, "a labels export (cell_id,x,y,label,...)"), []
    skipped: list[str] = []
    labels = qupath.labels_from_geojson(path, qupath.load_class_map(LABELS, class_map_path), cells, skipped)
    return labels, skipped


def run(
    slide: Path | str,
    cells_csv: Path | str,
    labels_csv: Path | str,
    out_dir: Path | str,
    margin: float,
    slide_id: str | None = None,
    class_map_path: Path | str | None = None,
) -> dict:
    """The command: read cells and labels (CSV, or QuPath GeoJSON through `class_map_path`), harvest the
    slide into `out_dir`, report skipped rows."""
    sid = slide_id_of(slide, slide_id)
    cells = _read_csv(Path(cells_csv), CELL_COLUMNS, "score-slide's cells.csv")
    labels, unread = read_labels(labels_csv, cells, class_map_path)
    result = harvest(slide, cells, labels, margin, sid, labels_csv)
    result.skipped[:0] = unread
    for message in result.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not result.rows:  # a wrong file must not wipe the slide's earlier harvest
        raise HarvestError(f"{labels_csv}: no label row matches a cell of {cells_csv}; nothing written")
    manifest = write_harvest(out_dir, result)
    counts = pd.Series([r["class"] for r in result.rows], dtype=str).value_counts().sort_index()
    by_class = ", ".join(f"{n} {c}" for c, n in counts.items()) or "no cells"
    print(
        f"harvest: {sid}: {len(result.rows)} cells ({by_class}), {len(result.skipped)} label rows skipped; "
        f"{len(manifest)} cells from {manifest['slide'].nunique()} slide(s) in {Path(out_dir) / MANIFEST}"
    )
    return {
        "slide_id": sid,
        "cells": len(result.rows),
        "skipped": len(result.skipped),
        "by_class": {str(c): int(n) for c, n in counts.items()},
        "total": len(manifest),
    }
