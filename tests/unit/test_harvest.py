"""Harvest (labelled slide cells -> class-folder dataset) on synthetic slides, and the config of several
sources (a Herlev + harvest ingest and model.init_from: tests/integration/test_harvest.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import harvest
from pipeline.cli import main
from pipeline.config import DataSource, GroupRule, LabelMap, load_params
from pipeline.data.ingest import ingest, ingest_sources
from pipeline.wsi.crops import read_crops
from pipeline.wsi.readers import open_slide
from tests.conftest import ROOT
from tests.harvest_slides import LABELS, write_labels, write_slide

MARGIN = 0.25


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    a, a_cells = write_slide(folder, "slide-a", 1)
    b, b_cells = write_slide(folder, "slide-b", 2)
    return {
        "a": (a, a_cells, write_labels(folder / "a-labels.csv", a_cells)),
        "b": (b, b_cells, write_labels(folder / "b-labels.csv", b_cells, LABELS[::-1])),
    }


def test_harvest_cuts_the_scoring_crops_and_ingest_accepts_them(slides, tmp_path):
    slide, cells_csv, labels_csv = slides["a"]
    out = tmp_path / "harvest"
    summary = harvest.run(slide, cells_csv, labels_csv, out, MARGIN)
    assert summary["cells"] == 6 and summary["skipped"] == 0

    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(manifest.columns) == list(harvest.MANIFEST_COLUMNS)
    assert set(manifest["group"]) == {"slide-a"} and sorted(manifest["class"]) == sorted(LABELS)
    cells = pd.read_csv(cells_csv)
    with open_slide(slide, mpp=1.0) as src:
        expected = read_crops(src, cells, MARGIN)
    for crop, label, cell_id in zip(expected, LABELS, cells["cell_id"]):
        png = out / label / f"slide-a-{cell_id}.png"
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), crop), png  # lossless, same pixels
    row = manifest[manifest["cell_id"] == "2"].iloc[0]
    assert row["reviewer"] == "dr a" and row["x"] == "300.0"
    assert row["sha256"] == harvest.hashlib.sha256((out / row["path"]).read_bytes()).hexdigest()

    # ingest reads it as a CSV source grouped by the `group` column; unsure / not_a_cell are excluded.
    result = ingest(
        out / "manifest.csv",
        LabelMap.load(ROOT / "configs/labels/harvest_binary.yaml"),
        GroupRule(regex=None, column="group"),
        progress=False,
    )
    assert sorted(r["label"] for r in result.rows) == ["benign", "benign", "malignant", "malignant"]
    assert {r["group"] for r in result.rows} == {"slide-a"}
    assert sorted(r["original_class"] for r in result.rejects) == ["not_a_cell", "unsure"]


def test_slides_merge_and_rerunning_a_slide_replaces_its_cells(slides, tmp_path):
    out = tmp_path / "harvest"
    for key in ("a", "b"):
        harvest.run(*slides[key], out, MARGIN)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(manifest) == 12 and manifest.groupby("slide").size().to_dict() == {"slide-a": 6, "slide-b": 6}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(manifest["path"])

    harvest.run(*slides["a"], out, MARGIN)  # the same again: nothing changes
    again = pd.read_csv(out / "manifest.csv", dtype=str)
    pd.testing.assert_frame_equal(again, manifest)

    # Relabelling a cell moves its crop to the new class folder; the old file goes.
    slide, cells_csv, _ = slides["a"]
    relabelled = write_labels(tmp_path / "relabel.csv", cells_csv, ["benign"] + LABELS[1:])
    harvest.run(slide, cells_csv, relabelled, out, MARGIN)
    final = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(final) == 12 and "benign/slide-a-1.png" in set(final["path"])
    assert not (out / "malignant/slide-a-1.png").exists() and (out / "benign/slide-a-1.png").is_file()
    assert (out / "malignant/slide-b-1.png").is_file()  # the other slide is untouched


def test_bad_label_rows_are_reported_and_skipped(slides, tmp_path, capsys):
    slide, cells_csv, labels_csv = slides["a"]
    rows = pd.read_csv(labels_csv)
    rows.loc[1, "cell_id"] = 99  # not in cells.csv
    rows.loc[2, "x"] = rows.loc[2, "x"] + 40  # another slide's cell 3
    rows.to_csv(tmp_path / "labels.csv", index=False)
    summary = harvest.run(slide, cells_csv, tmp_path / "labels.csv", tmp_path / "out", MARGIN, slide_id="case7")
    err = capsys.readouterr().err.splitlines()
    assert summary["cells"] == 4 and summary["skipped"] == 2
    assert any("line 3: cell_id '99' is not in cells.csv" in e for e in err)
    assert any("line 4: cell 3 is at" in e for e in err)
    assert (tmp_path / "out/malignant/case7-1.png").is_file()  # --slide-id names the files and the group

    rows = pd.read_csv(labels_csv)
    rows.loc[4, "label"] = "maybe"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    code = main(
        [
            "harvest",
            str(slide),
            "--cells",
            str(cells_csv),
            "--labels",
            str(tmp_path / "bad.csv"),
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "bad.csv: line 6: label 'maybe' is not one of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    rows = pd.read_csv(labels_csv).assign(cell_id=lambda f: f["cell_id"] + 100)  # another slide's labels
    rows.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(harvest.HarvestError, match="no label row matches"):
        harvest.run(slide, cells_csv, tmp_path / "other.csv", tmp_path / "out", MARGIN, slide_id="case7")
    assert len(pd.read_csv(tmp_path / "out/manifest.csv")) == 4  # the earlier harvest is intact
    with pytest.raises(harvest.HarvestError, match="slide id"):
        harvest.slide_id_of(slide, "../x")


# --------------------------------------------------------------------------- several sources


def test_sources_config_errors(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["source"] = "x"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="data.sources replaces data.source"):
        load_params(tmp_path / "both.yaml")
    raw["data"].pop("source")
    raw["data"]["sources"]["herlev"]["group"] = {"regex": None, "column": None}
    (tmp_path / "group.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"data.sources.herlev.group: set exactly one"):
        load_params(tmp_path / "group.yaml")
    # Label maps that disagree on the model's labels are refused.
    seven = DataSource("h7", "x", str(ROOT / "configs/labels/herlev_7class.yaml"))
    binary = DataSource("h", "x", str(ROOT / "configs/labels/herlev_binary.yaml"))
    with pytest.raises(ValueError, match="differ from"):
        ingest_sources((binary, seven))
