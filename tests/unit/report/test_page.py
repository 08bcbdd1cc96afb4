"""report.html without a browser (pipeline/report/page.py): a report without cells has no labelling UI,
and a full one fetches nothing from elsewhere. In Chromium: tests/e2e/test_report_labels.py."""

from __future__ import annotations

import numpy as np

from pipeline.report.page import PAGE_SIZE, png_data_uri, render_html
from tests.report_pages import OOD, gallery, summary


def test_report_without_cells_has_no_labelling_ui_and_nothing_external():
    empty = render_html(summary(n_cells=0, slide_call="no cells found"), None, [])
    assert "No cells found" in empty and "<script" not in empty and "export-labels" not in empty
    full = render_html(summary(**OOD), png_data_uri(np.zeros((4, 4, 3), np.uint8)), gallery(60))
    for needle in ("http://", "https://", "<script src", "<link"):
        assert needle not in full, needle  # self-contained: mailed or archived as one file
    assert full.count("<img") == 1 + 2 * 60 and full.count(" data-src=") == 2 * (60 - PAGE_SIZE)


def test_the_atypia_section_shows_burden_histogram_and_cells_out_of_domain_included():
    morph = {
        "atypia_method": "criteria",
        "n_measured": 700,
        "atypia_burden": 31,
        "atypia_burden_fraction": 31 / 800,
        "nc_threshold": 0.5,
        "min_nucleus_um": 10.0,
        "n_atypical_out_of_domain": 20,
        "nucleus_diameter_um": {"median": 8.5, "bin_edges": list(range(31)), "counts": [0] * 5 + [100] * 7 + [0] * 18},
    }
    crop = png_data_uri(np.zeros((8, 8, 3), np.uint8))
    cells = [
        {
            "rank": i + 1,
            "cell_id": 10 + i,
            "x": 5,
            "y": 6,
            "nucleus_diameter_um": 12.0,
            "nc_ratio": 0.7,
            "atypia": 0.9 - i / 10,
            "morph_reason": "",
            "p_malignant": 0.2,
            "call": "benign",
            "in_domain": i % 2 == 0,
            "crop_uri": crop,
        }
        for i in range(3)
    ]
    page = render_html(summary(**OOD, morphometry=morph), None, gallery(4), cells)
    assert "id='atypia-gallery'" in page and page.count("class='atypia-cell") == 3
    assert page.count("class='atypia-cell ood'") == 1 and "31 cells" in page and "<svg id='size-histogram'" in page
    assert "N/C 0.70" in page and "nucleus 12.0 µm" in page
    assert "atypia-gallery" not in render_html(summary(**OOD), None, gallery(4))  # older summaries: no section
