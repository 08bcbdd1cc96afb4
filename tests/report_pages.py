"""report.html in tests: synthetic summaries and galleries for `render_html` (no model), and Debian's
Chromium driven through playwright (never playwright's own download)."""

from __future__ import annotations

import csv
import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.report.page import png_data_uri

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
HEADER = ["cell_id", "x", "y", "label", "reviewer", "timestamp", "slide", "model"]
OOD = {
    "ood_warning": True,
    "fraction_out_of_domain": 0.12,
    "n_out_of_domain": 96,
    "max_ood_fraction": 0.05,
    "ood_method": "Mahalanobis distance on penultimate features",
}


@contextmanager
def chromium():
    """Debian's chromium through playwright (never playwright's own download)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it as root (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(context, url: str):
    """A page that records console errors and uncaught exceptions in `page.errors`."""
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#gallery[data-ready='1']")
    return page


def export_csv(page) -> tuple[str, list[list[str]]]:
    with page.expect_download() as info:
        page.click("#export-labels")
    download = info.value
    text = Path(download.path()).read_text(encoding="utf-8")
    return download.suggested_filename, list(csv.reader(io.StringIO(text)))


def summary(slide="/slides/case 17.tiff", version="3", **extra) -> dict:
    base = {
        "slide": slide,
        "width": 4000,
        "height": 3000,
        "mpp": 0.25,
        "mpp_source": "slide properties",
        "n_cells": 800,
        "n_malignant": 12,
        "fraction_malignant": 0.015,
        "n_indeterminate": 3,
        "top_k": 10,
        "top_k_mean": 0.71,
        "slide_call": "positive",
        "rule": "positive if at least 5 cells are malignant",
        "threshold": 0.5,
        "band": [0.4, 0.6],
        "temperature": 1.2,
        "tta": False,
        "model": {"uri": "models:/cytology-classifier@champion", "version": version},
        "seconds": {"total": 1.0},
        "saliency": "Grad-CAM for the malignant output",
    }
    return {**base, **extra}


def gallery(n: int, seed: int = 0, per_cell: dict | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        crop = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        items.append(
            {
                "rank": i + 1,
                "cell_id": 1000 + 7 * i,
                "x": 10 + 3 * i,
                "y": 20 + 5 * i,
                "diameter_um": 11.5,
                "p_malignant": float(1 - i / (n + 1)),
                "call": "malignant" if i % 2 else "benign",
                "crop_uri": png_data_uri(crop),
                "cam_uri": png_data_uri(crop[::-1].copy()),
                **(per_cell or {}).get(i, {}),
            }
        )
    return items
