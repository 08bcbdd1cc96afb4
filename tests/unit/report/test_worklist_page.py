"""DIR/worklist.html of `cytopipe score-slides`: self-contained, escaped, thumbnails, links, failed slides."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pipeline.report.worklist_page import render_worklist


def _row(stem: str, **values) -> dict:
    row = dict.fromkeys(["case_id", "priority", "slide_call", "n_cells", "n_malignant", "top_k_mean"], "")
    row.update(fraction_out_of_domain="", atypia_burden="", seconds=1.0, model_version="3", error="")
    row.update(slide=f"/slides/{stem}.tiff", status="scored", report=f"{stem}/report.html")
    return {**row, **values}


def test_the_page_lists_every_slide_with_thumbnail_link_and_reason(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(tmp_path / "a/heatmap.png")
    rows = [
        _row("a", case_id="<b>C1</b>", n_malignant=4, top_k_mean=0.91, fraction_out_of_domain=0.25, atypia_burden=2),
        _row("b", status="skipped", n_malignant=0, top_k_mean=0.2),  # no heat map on disk: no thumbnail
        _row("bad", status="failed", report="", error="/slides/bad.tiff: SlideError: <not a slide>"),
    ]
    page = render_worklist(rows, tmp_path)
    assert page.count("data:image/jpeg;base64,") == 1 and page.count("<tr class=") == 3
    assert 'href="a/report.html"' in page and 'href="b/report.html"' in page and "bad/report.html" not in page
    assert "&lt;b&gt;C1&lt;/b&gt;" in page and "<b>C1</b>" not in page  # text is escaped
    assert "Failed slides (1)" in page and "SlideError: &lt;not a slide&gt;" in page
    assert page.index("a.tiff") < page.index("b.tiff") < page.index("bad.tiff")  # the order given
    assert 'data-v="0.91"' in page and "25.0%" in page and "<script>" in page
    assert "http" not in page  # self-contained: nothing loads from elsewhere


def test_slides_not_scored_yet_are_listed_as_pending(tmp_path):
    rows = [_row("a", n_malignant=1), _row("b", status="pending", report="", seconds="")]
    page = render_worklist(rows, tmp_path)
    assert '<tr class="pending">' in page and "1 not scored yet (the run goes on)" in page
    assert "not scored yet" not in render_worklist(rows[:1], tmp_path)


def test_a_rewritten_heat_map_gets_a_new_thumbnail(tmp_path):
    (tmp_path / "a").mkdir()
    heatmap = tmp_path / "a/heatmap.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(heatmap)
    first = render_worklist([_row("a")], tmp_path)
    assert render_worklist([_row("a")], tmp_path) == first  # cached, the same
    Image.fromarray(np.full((300, 400, 3), 20, np.uint8)).save(heatmap)
    stat = heatmap.stat()
    os.utime(heatmap, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification time
    assert render_worklist([_row("a")], tmp_path) != first
