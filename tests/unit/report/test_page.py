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
