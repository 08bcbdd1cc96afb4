"""QuPath interop: score-slide's cells as a GeoJSON FeatureCollection QuPath opens by drag and drop, and a
GeoJSON exported from QuPath after review read back as the report's labels table (for `cytopipe harvest`).

The shape follows what QuPath 0.4/0.5 itself writes and reads (File > Export objects as GeoJSON,
qupath-core's PathObjectTypeAdapters): each Feature has a Polygon `geometry` in level-0 pixels (origin at
the top-left of the full-resolution image) and `properties` with `objectType`, `classification`
{name, color: [r, g, b]} and `measurements` as one object of name -> number (QuPath reads the pre-0.4
list of {name, value} too, but writes the object). Neither `id` (QuPath makes a UUID on import when
absent; a non-UUID id would be ignored) nor `isLocked` (written only when true) is needed. See
docs/qupath.md for the pages followed.

Detection keeps no contour, so a cell's polygon is the ellipse inscribed in its bounding box. Pixel i
covers [i, i+1) in QuPath's coordinates, so the box of pixels x0..x1-1 (x1 exclusive, as in cells.csv)
spans x0..x1: the polygon touches x0, y0, x1 and y1 exactly and its bounding box equals the cell's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import atomic
from pipeline.errors import CytopipeError

VERTICES = 32  # a multiple of 4, so the four extreme points of the ellipse are vertices
# The model's call is exported under its own class names, which no class map lists: a cell a reviewer
# never touched is skipped by harvest, never learnt as a label it was not given ("looked and agreed"
# cannot be told from "never looked"). To confirm a call, the reviewer sets a review class.
MODEL_CLASS_PREFIX = "cytopipe "


class QuPathError(CytopipeError, ValueError):
    """A QuPath GeoJSON file or class map that cannot be read; one line naming the file."""


CALL_COLORS = {  # distinct on a Papanicolaou slide; the report's colours, brightened for an overlay
    "malignant": (220, 40, 40),
    "indeterminate": (240, 160, 0),
    "benign": (40, 170, 70),
    "out of domain": (150, 90, 210),
}
# cells.csv columns that are the cell's identity or geometry, or text: never measurements.
NOT_MEASURED = {"cell_id", "x0", "y0", "x1", "y1", "call", "morph_reason"}
MEASUREMENT_DECIMALS = 6
DEFAULT_CLASS_MAP = Path(__file__).resolve().parents[1] / "configs" / "labels" / "qupath_review.yaml"


# --------------------------------------------------------------------------- out: cells.csv -> GeoJSON


def ellipse_ring(x0: float, y0: float, x1: float, y1: float, n: int = VERTICES) -> list[list[float]]:
    """The closed ring of the ellipse inscribed in [x0, x1] x [y0, y1]: `n` vertices plus the first again,
    counter-clockwise in the coordinates' own (x right, y up) sense as RFC 7946 asks of exterior rings."""
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    t = 2 * np.pi * np.arange(n) / n
    xs, ys = cx + rx * np.cos(t), cy + ry * np.sin(t)
    # cos/sin at the quarter turns are off by ~1e-16: pin the extreme points so the box is exact.
    q = n // 4
    xs[0], xs[2 * q], ys[q], ys[3 * q] = x1, x0, y1, y0
    xs[[q, 3 * q]], ys[[0, 2 * q]] = cx, cy
    ring = [[round(float(x), 3), round(float(y), 3)] for x, y in zip(xs, ys)]
    return ring + [ring[0]]


def _number(value) -> float | None:
    """A finite float for a measurement, or None (NaN, text and missing values are left out)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _measurements(row: dict) -> dict[str, float]:
    out = {"cell_id": float(row["cell_id"])}  # a number: QuPath measurements are numbers only
    for name, value in row.items():
        v = None if name in NOT_MEASURED else _number(value)
        if v is not None:
            out[name] = round(v, MEASUREMENT_DECIMALS)
    return out


def cell_feature(row: dict) -> dict:
    """One cells.csv row as a QuPath detection Feature."""
    call = str(row.get("call", ""))
    color = CALL_COLORS.get(call, (128, 128, 128))
    return {
        "type": "Feature",
        "geometry": {
            "type": "Polygon",
            "coordinates": [ellipse_ring(*(float(row[k]) for k in ("x0", "y0", "x1", "y1")))],
        },
        "properties": {
            "objectType": "detection",
            "name": f"cell {row['cell_id']}",
            "classification": {"name": MODEL_CLASS_PREFIX + call, "color": list(color)},
            "measurements": _measurements(row),
        },
    }


def cells_feature_collection(cells: pd.DataFrame) -> dict:
    """A GeoJSON FeatureCollection of score-slide's cells table: one detection per cell."""
    return {"type": "FeatureCollection", "features": [cell_feature(r) for r in cells.to_dict("records")]}


def write_cells_geojson(path: Path | str, cells: pd.DataFrame) -> None:
    """cells.geojson beside cells.csv, written atomically (QuPath may be reading the old one)."""
    atomic.write_text(path, json.dumps(cells_feature_collection(cells), separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------- in: QuPath GeoJSON -> labels


def load_class_map(labels: tuple[str, ...], path: Path | str | None = None) -> dict[str, str]:
    """QuPath classification name -> one of `labels` (harvest's), from a YAML file with a `classes:` mapping."""
    import yaml

    path = Path(DEFAULT_CLASS_MAP if path is None else path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuPathError(f"{path}: class map not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise QuPathError(f"{path}: not a readable YAML class map ({' '.join(str(exc).split())})") from None
    classes = raw.get("classes") if isinstance(raw, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise QuPathError(f"{path}: not a class map: expected `classes:` mapping QuPath names to labels")
    bad = {str(k): v for k, v in classes.items() if v not in labels}
    if bad:
        name, label = next(iter(bad.items()))
        raise QuPathError(f"{path}: class {name!r} maps to {label!r}, not one of {', '.join(labels)}")
    return {str(k): str(v) for k, v in classes.items()}


def _features(path: Path) -> list:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuPathError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise QuPathError(f"{path}: not a readable JSON file ({' '.join(str(exc).split())})") from None
    # QuPath writes a FeatureCollection, or a bare list of features (exportObjectsToGeoJson without
    # "FEATURE_COLLECTION"), or a single Feature for one object.
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    if isinstance(doc, list):
        return doc
    raise QuPathError(f"{path}: not GeoJSON: expected a FeatureCollection or a list of Features")


def class_name(properties: dict) -> str | None:
    """The QuPath classification as QuPath prints it ("Tumor", or "Tumor: Positive" for a derived class)."""
    c = properties.get("classification")
    if isinstance(c, str):  # older exports and hand-written files
        return c or None
    if not isinstance(c, dict):
        return None
    if isinstance(c.get("names"), list) and c["names"]:
        return ": ".join(str(n) for n in c["names"])
    return str(c["name"]) if c.get("name") else None


def label_for(name: str, class_map: dict[str, str]) -> str | None:
    """Exact name, else the same ignoring case, else the base of a derived class ("Tumor: Positive" -> Tumor)."""
    if name in class_map:
        return class_map[name]
    folded = {k.casefold(): v for k, v in class_map.items()}
    for candidate in (name, name.split(":")[0].strip()):
        if candidate.casefold() in folded:
            return folded[candidate.casefold()]
    return None


def _points(geometry, where: str) -> np.ndarray:
    """The geometry's reference points: one centroid for a (Multi)Polygon, each point of a (Multi)Point."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    try:
        coords = geometry["coordinates"]
        if kind == "Point":
            return np.asarray([coords], dtype=float).reshape(1, 2)
        if kind == "MultiPoint":
            return np.asarray(coords, dtype=float).reshape(-1, 2)
        if kind in ("Polygon", "MultiPolygon"):
            rings = [coords[0]] if kind == "Polygon" else [p[0] for p in coords]
            return _centroid([np.asarray(r, dtype=float).reshape(-1, 2) for r in rings]).reshape(1, 2)
    except (KeyError, IndexError, TypeError, ValueError):
        raise QuPathError(f"{where}: malformed {kind} coordinates") from None
    raise QuPathError(f"{where}: geometry {kind!r} is not a Polygon, MultiPolygon or Point")


def _centroid(rings: list[np.ndarray]) -> np.ndarray:
    """Area-weighted centroid of the exterior rings (holes ignored: a cell outline has none)."""
    total, cx, cy = 0.0, 0.0, 0.0
    for ring in rings:
        if len(ring) < 3 or not np.isfinite(ring).all():
            raise ValueError("ring")
        x, y = ring[:, 0], ring[:, 1]
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        cross = x * yn - xn * y
        total += cross.sum() / 2
        cx, cy = cx + ((x + xn) * cross).sum() / 6, cy + ((y + yn) * cross).sum() / 6
    if abs(total) < 1e-12:  # a degenerate outline: its vertices' mean is as good as it gets
        return np.concatenate(rings).mean(axis=0)
    return np.array([cx / total, cy / total])


def _cell_id(measurements) -> str | None:
    if isinstance(measurements, list):  # the pre-0.4 layout: [{name, value}, ...]
        measurements = {m.get("name"): m.get("value") for m in measurements if isinstance(m, dict)}
    v = _number(measurements.get("cell_id")) if isinstance(measurements, dict) else None
    if v is None:
        return None
    return str(int(v)) if v.is_integer() else str(v)


def _at_cell(point: np.ndarray, cells: pd.DataFrame | None) -> dict | None:
    """The cell whose bounding box holds `point`, the nearest centre if several; None if none does."""
    if cells is None or cells.empty:
        return None
    box = cells[["x0", "y0", "x1", "y1"]].to_numpy(float)
    px, py = point
    inside = (box[:, 0] <= px) & (px <= box[:, 2]) & (box[:, 1] <= py) & (py <= box[:, 3])
    if not inside.any():
        return None
    d = np.hypot(cells["x"].to_numpy(float) - px, cells["y"].to_numpy(float) - py)
    return cells.iloc[int(np.argmin(np.where(inside, d, np.inf)))].to_dict()


def _text(v) -> str:
    """A value as the labels CSV holds it once read as text (pandas writes 300.0 as "300.0")."""
    return str(v) if isinstance(v, str) else str(float(v))


def _feature_rows(feature, where: str, class_map: dict, cells, skipped: list) -> list[dict]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise QuPathError(f"{where}: not a GeoJSON Feature")
    props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
    name = class_name(props)
    label = None if name is None else label_for(name, class_map)
    if label is None:
        why = "has no classification" if name is None else f"class {name!r} is not in the class map"
        skipped.append(f"{where}: {why}; skipped")
        return []
    rows, cell_id = [], _cell_id(props.get("measurements"))
    meas = props.get("measurements") if isinstance(props.get("measurements"), dict) else {}
    for point in _points(feature.get("geometry"), where):
        cell = None if cell_id is not None else _at_cell(point, cells)
        if cell_id is not None:  # ours: the centre it was exported with, so a wrong slide is still caught
            x, y = (meas.get(k) if _number(meas.get(k)) is not None else c for k, c in zip("xy", point))
            row = {"cell_id": cell_id, "x": _text(x), "y": _text(y)}
        elif cell is not None:  # drawn in QuPath (a point or outline on a cell): the cell under it
            row = {"cell_id": _cell_id({"cell_id": cell["cell_id"]}), "x": _text(cell["x"]), "y": _text(cell["y"])}
        else:
            skipped.append(f"{where}: no cell_id and no cell at ({point[0]:.1f}, {point[1]:.1f}); skipped")
            continue
        rows.append({**row, "label": label, "reviewer": "", "timestamp": "", "where": where})
    return rows


def labels_from_geojson(
    path: Path | str, class_map: dict[str, str], cells: pd.DataFrame | None = None, skipped: list | None = None
) -> pd.DataFrame:
    """The labels table (cell_id, x, y, label, reviewer, timestamp; all text, as harvest reads the CSV)
    from a GeoJSON QuPath exported after review. A feature names its cell by its `cell_id` measurement;
    one without (drawn in QuPath) names the cell of `cells` whose box holds its centroid. Features
    without a classification, or with one not in `class_map`, are skipped: one reason each is appended
    to `skipped`. Malformed input raises HarvestError naming the file."""
    path = Path(path)
    skipped = [] if skipped is None else skipped
    rows = []
    for i, feature in enumerate(_features(path), start=1):
        rows += _feature_rows(feature, f"{path}: feature {i}", class_map, cells, skipped)
    columns = ["cell_id", "x", "y", "label", "reviewer", "timestamp"]
    frame = pd.DataFrame([{k: r[k] for k in columns} for r in rows], columns=columns, dtype=str)
    frame.attrs["where"] = [r["where"] for r in rows]  # harvest.match_labels names features, not CSV lines
    return frame
