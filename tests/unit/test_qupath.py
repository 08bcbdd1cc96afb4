"""QuPath GeoJSON in and out (pipeline/qupath.py): cells.geojson is valid GeoJSON in QuPath's shape, and a
QuPath-style review comes back through `harvest` to the same labels and dataset as the report's CSV."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline import atomic, harvest, qupath
from tests.conftest import ROOT
from tests.harvest_slides import LABELS, write_labels, write_slide

MARGIN = 0.25
CALLS = ["malignant", "indeterminate", "benign", "out of domain"]
NUMBER = {"type": "number"}
POSITION = {"type": "array", "items": NUMBER, "minItems": 2, "maxItems": 2}
# RFC 7946 as it applies here: a FeatureCollection of Features with Polygon geometries, plus QuPath's
# properties (objectType, classification {name, color}, measurements as name -> number).
SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "array", "minItems": 4, "items": POSITION},
                            },
                        },
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification", "measurements"],
                        "properties": {
                            "objectType": {"const": "detection"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "color": {
                                        "type": "array",
                                        "minItems": 3,
                                        "maxItems": 3,
                                        "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                    },
                                },
                            },
                            "measurements": {"type": "object", "additionalProperties": NUMBER},
                        },
                    },
                },
            },
        },
    },
}


def cells_table() -> pd.DataFrame:
    """A cells.csv as score-slide writes it: one cell per call, some morphometry missing (NaN)."""
    rows = []
    for i, (call, (x0, y0, x1, y1)) in enumerate(
        zip(CALLS, [(0, 10, 37, 47), (270, 270, 331, 331), (765, 465, 836, 536), (1175, 875, 1226, 920)]), 1
    ):
        rows.append(
            {
                "cell_id": i,
                "x": (x0 + x1) / 2 + 0.4,
                "y": (y0 + y1) / 2 - 0.3,
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "diameter_um": 9.25,
                "area_um2": 60.1,
                "score": 0.9 - 0.2 * i,
                "call": call,
                "ood_score": 0.05 * i,
                "in_domain": call != "out of domain",
                "nucleus_diameter_um": np.nan if i == 2 else 5.5,
                "nc_ratio": np.nan if i == 2 else 0.31,
                "atypia": 0.7,
                "morph_reason": "" if i != 2 else "no nucleus found",
            }
        )
    return pd.DataFrame(rows)


def signed_area(ring) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])) / 2


def check_schema(doc, schema, where="$"):
    """The JSON-schema keywords SCHEMA uses, checked by hand (no extra dependency)."""
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float)}
    if kind:
        assert isinstance(doc, types[kind]) and not isinstance(doc, bool), f"{where}: not {kind}"
    if kind == "number":
        assert math.isfinite(doc), f"{where}: not finite"
    assert "const" not in schema or doc == schema["const"], f"{where}: {doc!r} != {schema['const']!r}"
    for key in schema.get("required", []):
        assert key in doc, f"{where}: missing {key}"
    for key, sub in schema.get("properties", {}).items():
        if key in doc:
            check_schema(doc[key], sub, f"{where}.{key}")
    if "additionalProperties" in schema:
        for key, value in doc.items():
            check_schema(value, schema["additionalProperties"], f"{where}.{key}")
    if kind == "array":
        assert schema.get("minItems", 0) <= len(doc) <= schema.get("maxItems", len(doc)), f"{where}: length"
        for i, item in enumerate(doc):
            check_schema(item, schema.get("items", {}), f"{where}[{i}]")
    for bound, ok in (("minimum", lambda a, b: a >= b), ("maximum", lambda a, b: a <= b)):
        assert bound not in schema or ok(doc, schema[bound]), f"{where}: {bound}"


def test_cells_geojson_is_valid_geojson_in_qupaths_shape():
    cells = cells_table()
    doc = json.loads(json.dumps(qupath.cells_feature_collection(cells), allow_nan=False))  # strict JSON
    check_schema(doc, SCHEMA)
    try:  # also the reference validator, where the environment has it (nbformat brings it)
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(doc, SCHEMA)
    assert len(doc["features"]) == len(cells)
    for feature, cell in zip(doc["features"], cells.to_dict("records")):
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == qupath.VERTICES + 1  # closed
        assert signed_area(ring) > 0  # counter-clockwise in the coordinates' own sense (RFC 7946 3.1.6)
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        # x1/y1 are exclusive pixel indices: the last pixel's far edge, where QuPath's box of the cell ends.
        assert (min(xs), min(ys), max(xs), max(ys)) == (cell["x0"], cell["y0"], cell["x1"], cell["y1"])
        cls = feature["properties"]["classification"]
        assert (
            cls["name"] == qupath.MODEL_CLASS_PREFIX + cell["call"]
            and tuple(cls["color"]) == qupath.CALL_COLORS[cell["call"]]
        )
        m = feature["properties"]["measurements"]
        assert m["cell_id"] == cell["cell_id"] and m["score"] == pytest.approx(cell["score"])
        assert m["ood_score"] == pytest.approx(cell["ood_score"]) and m["diameter_um"] == 9.25
        assert m["x"] == cell["x"] and m["in_domain"] == float(cell["in_domain"])
        assert not {"x0", "x1", "call", "morph_reason"} & set(m)
    assert len({tuple(c) for c in qupath.CALL_COLORS.values()}) == 4  # one colour per call
    nan_cell = doc["features"][1]["properties"]["measurements"]
    assert "nc_ratio" not in nan_cell and "nucleus_diameter_um" not in nan_cell  # NaN left out
    assert doc["features"][0]["properties"]["measurements"]["nc_ratio"] == 0.31
    assert qupath.cells_feature_collection(cells.iloc[:0]) == {"type": "FeatureCollection", "features": []}


def test_writing_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "cells.geojson"
    qupath.write_cells_geojson(path, cells_table())
    before = path.read_bytes()
    assert json.loads(before)["type"] == "FeatureCollection"

    def fail(_self, *_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.Path, "write_text", fail)
    with pytest.raises(OSError):
        qupath.write_cells_geojson(path, cells_table().iloc[:1])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["cells.geojson"]


def review(doc: dict, classes: dict[int, str | None]) -> dict:
    """What QuPath writes after a reviewer set classes: each feature gets an id and the new class; a
    feature whose class was removed has no `classification`."""
    out = json.loads(json.dumps(doc))
    for i, feature in enumerate(out["features"]):
        feature["id"] = f"00000000-0000-4000-8000-{i:012d}"
        name = classes.get(int(feature["properties"]["measurements"]["cell_id"]), "keep")
        if name is None:
            del feature["properties"]["classification"]
        elif name != "keep":
            feature["properties"]["classification"] = {"name": name, "color": [1, 2, 3]}
    return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qupath")
    slide, cells_csv = write_slide(folder, "slide-q", 3)
    return folder, slide, cells_csv


def reviewed_pair(folder, cells_csv):
    """A QuPath review of every cell of tests/harvest_slides.py and the report CSV with the same labels."""
    cells = pd.read_csv(cells_csv)
    names = {"malignant": "Tumor", "benign": "benign", "unsure": "Other", "not_a_cell": "Ignore*"}
    classes = {int(c): names[lab] for c, lab in zip(cells["cell_id"], LABELS)}
    geojson = folder / "reviewed.geojson"
    geojson.write_text(json.dumps(review(qupath.cells_feature_collection(cells), classes)))
    csv = write_labels(folder / "labels.csv", cells_csv)
    frame = pd.read_csv(csv)
    frame[["reviewer", "timestamp"]] = ""  # QuPath carries neither
    frame.drop(columns=["slide", "model"]).to_csv(csv, index=False)
    return geojson, csv


def test_a_qupath_review_reads_back_as_the_csv_labels(slide):
    folder, _, cells_csv = slide
    geojson, csv = reviewed_pair(folder, cells_csv)
    class_map = qupath.load_class_map(harvest.LABELS, ROOT / "configs/labels/qupath_review.yaml")
    got = qupath.labels_from_geojson(geojson, class_map)
    expected = pd.read_csv(csv, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(got, expected)
    assert got.attrs["where"][0] == f"{geojson}: feature 1"


def test_harvest_of_the_geojson_makes_the_csvs_dataset(slide, tmp_path, capsys):
    folder, slide_path, cells_csv = slide
    geojson, csv = reviewed_pair(folder, cells_csv)
    from_csv = harvest.run(slide_path, cells_csv, csv, tmp_path / "csv", MARGIN)
    from_geojson = harvest.run(slide_path, cells_csv, geojson, tmp_path / "geojson", MARGIN)
    assert from_csv == from_geojson and from_csv["cells"] == len(LABELS)
    a = pd.read_csv(tmp_path / "csv/manifest.csv", dtype=str)
    pd.testing.assert_frame_equal(a, pd.read_csv(tmp_path / "geojson/manifest.csv", dtype=str))
    for rel in a["path"]:
        assert (tmp_path / "csv" / rel).read_bytes() == (tmp_path / "geojson" / rel).read_bytes()


def test_unclassified_unmapped_and_drawn_features(slide, tmp_path):
    folder, _, cells_csv = slide
    cells = pd.read_csv(cells_csv, dtype=str)
    doc = review(qupath.cells_feature_collection(pd.read_csv(cells_csv)), {1: None, 2: "Region*", 3: "Tumor: Positive"})
    # A point the reviewer clicked on cell 5, one on the glass, and an outline drawn around cell 6.
    doc["features"] = doc["features"][:4] + [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [503, 998]},
            "properties": {"classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [5, 5]},
            "properties": {"classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[1390, 190], [1410, 190], [1410, 210], [1390, 210], [1390, 190]]],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"names": ["Stroma", "Positive"], "color": [0, 0, 0]},
            },
        },
    ]
    path = tmp_path / "review.json"
    path.write_text(
        json.dumps(doc["features"])
    )  # a bare list, as exportObjectsToGeoJson writes without FEATURE_COLLECTION
    skipped = []
    got = qupath.labels_from_geojson(path, qupath.load_class_map(harvest.LABELS), cells, skipped)
    assert got[["cell_id", "label"]].values.tolist() == [
        ["3", "malignant"],  # derived class -> its base class
        ["5", "malignant"],
        ["6", "benign"],
    ]
    assert got.loc[got["cell_id"] == "5", ["x", "y"]].values.tolist() == [["500.0", "1000.0"]]  # the cell's centre
    assert skipped == [
        f"{path}: feature 1: has no classification; skipped",
        f"{path}: feature 2: class 'Region*' is not in the class map; skipped",
        # Still the model's call: nobody classified it, so it is not learnt as a label.
        f"{path}: feature 4: class 'cytopipe benign' is not in the class map; skipped",
        f"{path}: feature 6: no cell_id and no cell at (5.0, 5.0); skipped",
    ]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not a readable JSON file"),
        ('{"type": "Topology"}', "not GeoJSON: expected a FeatureCollection or a list of Features"),
        ('[{"type": "Geometry"}]', "feature 1: not a GeoJSON Feature"),
        (
            '[{"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, '
            '"geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}]',
            "feature 1: geometry 'LineString' is not a Polygon, MultiPolygon or Point",
        ),
        (
            '{"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, '
            '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1]]]}}',
            "feature 1: malformed Polygon coordinates",
        ),
    ],
)
def test_malformed_geojson_is_one_line_naming_the_file(tmp_path, text, reason):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(qupath.QuPathError) as err:
        qupath.labels_from_geojson(path, {"Tumor": "malignant"})
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value) and "\n" not in str(err.value)


def test_missing_geojson_and_bad_class_maps(tmp_path):
    with pytest.raises(qupath.QuPathError, match="file not found"):
        qupath.labels_from_geojson(tmp_path / "nope.geojson", {})
    cases = {
        "absent": None,
        "list.yaml": "- a\n",
        "bad.yaml": "classes:\n  Tumor: cancer\n",
        "broken.yaml": "classes: [\n",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(qupath.QuPathError) as err:
            qupath.load_class_map(harvest.LABELS, tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(err.value)
    assert "'Tumor' maps to 'cancer'" in str(
        pytest.raises(qupath.QuPathError, qupath.load_class_map, harvest.LABELS, tmp_path / "bad.yaml").value
    )
