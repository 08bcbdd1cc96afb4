"""`cytopipe score-slide` end to end: synthetic slides, a real CSF field, and bad input (the report in
Chromium: tests/e2e/test_score_slide_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.inference.score_slide import score_slide
from pipeline.morphometry.segmentation import NO_NUCLEUS
from pipeline.morphometry.slides import CELL_COLUMNS as MORPH_COLUMNS
from tests.conftest import SHARED_DATA
from tests.slides import CELLS, MPP


@pytest.fixture(scope="module")
def project(tiny_project):
    root, _, params = tiny_project  # the session's tiny project: read only here
    return root, params


def test_cells_are_found_scored_and_summarised(scored):
    out, summary = scored
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns) == [
        "cell_id",
        "x",
        "y",
        "x0",
        "y0",
        "x1",
        "y1",
        "diameter_um",
        "area_um2",
        "score",
        "call",
        "ood_score",
        "in_domain",
        *MORPH_COLUMNS,
    ]
    assert len(cells) == len(CELLS) == summary["n_cells"]
    for cx, cy, r, *_ in CELLS:  # every drawn cell, at the right level-0 place
        d = np.hypot(cells["x"] - cx, cells["y"] - cy)
        assert d.min() < 8, (cx, cy)
    inside = cells["in_domain"]
    assert cells["score"].between(0, 1).all() and set(cells.loc[inside, "call"]) <= {
        "benign",
        "malignant",
        "indeterminate",
    }
    assert (cells.loc[~inside, "call"] == "out of domain").all() and summary["n_out_of_domain"] == int((~inside).sum())
    assert summary["mpp"] == pytest.approx(MPP) and summary["mpp_source"] == "slide properties"
    assert summary["n_malignant"] == int((cells["call"] == "malignant").sum())
    assert summary["slide_call"].split(" ")[0] in ("positive", "negative") and "at least" in summary["rule"]
    top = np.sort(cells["score"].to_numpy())[::-1][: summary["top_k"]].mean()
    assert summary["top_k_mean"] == pytest.approx(top, abs=1e-5)
    top_in = np.sort(cells.loc[inside, "score"].to_numpy())[::-1][: summary["top_k"]].mean() if inside.any() else None
    assert summary["top_k_mean_in_domain"] == (pytest.approx(top_in, abs=1e-5) if inside.any() else None)
    assert {"plan tiles", "detect cells", "crop + inference", "saliency", "report", "total"} <= set(summary["seconds"])
    assert summary["inference"]["backend"] == "torch" and summary["inference"]["inference_workers"] >= 1
    assert summary["inference"]["cells_per_second"] > 0 and summary["saliency"].startswith("Grad-CAM")
    assert json.loads((out / "summary.json").read_text())["n_cells"] == len(cells)
    geojson = json.loads((out / "cells.geojson").read_text())  # the same cells, for QuPath
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == len(cells)
    ids = [f["properties"]["measurements"]["cell_id"] for f in geojson["features"]]
    assert ids == cells["cell_id"].tolist()
    assert Image.open(out / "heatmap.png").size[0] > 0


def test_report_is_self_contained(scored):
    out, summary = scored
    page = (out / "report.html").read_text()
    assert "decision support" in page.lower() and "pathologist" in page
    # heat map + (crop, Grad-CAM) per gallery cell + one outlined crop per cell of the atypia gallery
    assert page.count("<img") == 1 + 2 * 8 + page.count("class='atypia-cell")
    # every embedded image is JPEG (a PNG gallery made a 500-cell report 33 MB; benchmarks/report_size.py)
    assert page.count("data:image/jpeg;base64,") == page.count("<img") and "data:image/png" not in page
    assert "src='http" not in page and 'src="http' not in page  # nothing fetched from elsewhere
    assert "level-0 x=" in page and f"{summary['threshold']:.4f}" in page
    card = summary["model"]["card"]  # the model card's key facts, as the calibrated model carries them
    assert card["heldout_source"] == "validation" and "Validated on" in page
    assert f"{card['heldout_auc']:.3f} [{card['heldout_auc_ci'][0]:.3f}, {card['heldout_auc_ci'][1]:.3f}]" in page


def test_every_drawn_nucleus_is_measured_in_micrometres(scored):
    """tests/slides.py draws every other cell with a nucleus of half its radius: N/C 0.25, diameter = r px."""
    out, summary = scored
    cells = pd.read_csv(out / "cells.csv")
    for i, (cx, cy, r) in enumerate(CELLS[:-2]):  # the last two touch each other
        row = cells.iloc[int(np.argmin(np.hypot(cells["x"] - cx, cells["y"] - cy)))]
        if i % 2:
            assert row["morph_reason"] == NO_NUCLEUS and np.isnan(row["nc_ratio"]), (i, row.to_dict())
        else:
            assert row["morph_reason"] != NO_NUCLEUS, (i, row.to_dict())
            assert row["nucleus_diameter_um"] == pytest.approx(r * MPP, rel=0.1), (i, row.to_dict())
            assert row["nc_ratio"] == pytest.approx(0.25, rel=0.15), (i, row.to_dict())
    morph = summary["morphometry"]
    assert morph["n_measured"] == int((cells["morph_reason"].fillna("") == "").sum())
    assert sum(morph["nucleus_diameter_um"]["counts"]) == morph["n_measured"] and morph["seconds"] >= 0
    assert morph["atypia_method"] == "criteria" and cells["atypia"].equals(cells["atypia_criteria"])


def test_blank_slide_reports_no_cells(project, slides, tmp_path):
    root, params = project
    summary = score_slide(str(slides[1]), str(root / "models/calibrated"), tmp_path, params.slide, log=lambda *_: None)
    assert summary["n_cells"] == 0 and summary["slide_call"] == "no cells found"
    assert "No cells found" in (tmp_path / "report.html").read_text()
    assert len(pd.read_csv(tmp_path / "cells.csv")) == 0


def test_real_csf_field_as_a_plain_png(project, tmp_path):
    import openslide

    root, params = project
    real = SHARED_DATA / "slides" / "csf-breast-carcinoma-pap.tiff"
    if not real.is_file():
        pytest.fail(f"reference slide missing: {real}")
    with openslide.OpenSlide(str(real)) as s:  # a cell-rich field near the middle
        field = np.asarray(s.read_region((13000, 13000), 0, (1536, 1536)).convert("RGB"))
    png = tmp_path / "csf field.png"
    Image.fromarray(field).save(png)
    summary = score_slide(
        str(png), str(root / "models/calibrated"), tmp_path / "out", params.slide, mpp=0.25, top=4, log=lambda *_: None
    )
    assert summary["mpp_source"] == "--mpp" and summary["n_cells"] > 0
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert cells["x"].between(0, 1536).all() and cells["diameter_um"].between(5, 60).all()


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "score-slide", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("kind", ["missing", "directory", "not a slide"])
def test_bad_slide_input_is_one_line(project, tmp_path, kind):
    root, _ = project
    target = {"missing": tmp_path / "nope.svs", "directory": tmp_path, "not a slide": tmp_path / "notes.tiff"}[kind]
    if kind == "not a slide":
        target.write_text("this is not a slide")
    proc = _cli(
        str(target),
        "--model",
        str(root / "models/calibrated"),
        "--out",
        str(tmp_path / "o"),
        "--params",
        str(root / "params.yaml"),
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(target.name) in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_without_a_champion_says_how_to_get_one(project, slides, tmp_path):
    root, _ = project
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text().replace(str(root / "mlflow.db"), str(tmp_path / "empty.db")))
    proc = _cli(str(slides[0]), "--params", str(params), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 1 and "make run" in proc.stderr and "--model" in proc.stderr
    assert "Traceback" not in proc.stderr
