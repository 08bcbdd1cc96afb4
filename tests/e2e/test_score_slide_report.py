"""The report of `cytopipe score-slide` in Chromium: it renders without errors, and the labels exported
from it are those of cells.csv (on the session's tiny project)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.report_pages import CHROMIUM, HEADER, chromium, export_csv, open_page


@pytest.fixture(scope="module")
def project(tiny_project):
    root, _, params = tiny_project  # the session's tiny project: read only here
    return root, params


def test_report_renders_in_chromium_without_errors(scored):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it as root (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    out, _ = scored
    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        widths = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        heat = page.eval_on_selector("img.thumb", "i => i.naturalWidth")
        browser.close()
    assert len(widths) == 16 and all(w > 0 for w in widths), widths
    assert heat > 0
    assert errors == []


def test_labels_exported_from_the_report_match_cells_csv(scored):
    """What `cytopipe harvest` reads back: the exported cell_id, x, y are those of cells.csv."""
    out, summary = scored
    cells = pd.read_csv(out / "cells.csv").set_index("cell_id")
    with chromium() as browser:
        page = open_page(browser.new_context(accept_downloads=True), (out / "report.html").as_uri())
        ids = page.eval_on_selector_all(".cell", "cs => cs.map(c => c.dataset.cellId)")
        page.click(f".cell[data-cell-id='{ids[0]}'] button[data-label='malignant']")
        page.click(f".cell[data-cell-id='{ids[-1]}'] button[data-label='not_a_cell']")
        name, rows = export_csv(page)
        assert page.errors == []
    assert name == f"{Path(summary['slide']).stem}-labels.csv" and rows[0] == HEADER
    assert [(r[0], r[3]) for r in rows[1:]] == [(ids[0], "malignant"), (ids[-1], "not_a_cell")]
    for r in rows[1:]:
        assert (int(r[1]), int(r[2])) == tuple(cells.loc[int(r[0]), ["x", "y"]]) and r[6] == summary["slide"]


def test_the_atypia_gallery_renders_with_outlines_and_includes_out_of_domain_cells(scored):
    """The second gallery ranks every cell by its atypia score, cells the network calls out of domain too;
    each crop has its nucleus outlined (drawn into the image) and shows N/C, diameter and atypia."""
    out, summary = scored
    cells = pd.read_csv(out / "cells.csv")
    with chromium() as browser:
        page = open_page(browser.new_context(), (out / "report.html").as_uri())
        ids = page.eval_on_selector_all("#atypia-gallery .atypia-cell", "cs => cs.map(c => +c.dataset.cellId)")
        widths = page.eval_on_selector_all("#atypia-gallery img", "imgs => imgs.map(i => i.naturalWidth)")
        text = page.inner_text("#atypia-gallery")
        burden = page.inner_text("#atypia-burden")
        assert page.errors == []
    shown = cells.set_index("cell_id").loc[ids, "atypia"].to_numpy()
    rest = cells.loc[~cells["cell_id"].isin(ids), "atypia"].dropna()
    assert ids and all(w > 0 for w in widths)
    assert (shown[:-1] >= shown[1:] - 1e-4).all() and (rest.empty or shown.min() >= rest.max() - 1e-4)
    assert "N/C" in text and "atypia" in text and str(summary["morphometry"]["atypia_burden"]) in burden
    ood_ids = set(cells.loc[~cells["in_domain"], "cell_id"])
    assert ood_ids & set(ids), "the atypia gallery must include cells the network calls out of domain"
