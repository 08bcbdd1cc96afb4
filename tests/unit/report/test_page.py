"""report.html without a browser (pipeline/report/page.py): a report without cells has no labelling UI,
and a full one fetches nothing from elsewhere. In Chromium: tests/e2e/test_report_labels.py."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
from PIL import Image

from pipeline.morphometry.cells import nucleus_outline
from pipeline.report.page import (
    PAGE_SIZE,
    gallery_data_uri,
    heatmap_data_uri,
    image_data_uri,
    png_data_uri,
    render_html,
)
from tests.report_pages import OOD, gallery, summary

CYAN = (0, 200, 255)  # nucleus_outline's colour
MORPH = {
    "atypia_method": "criteria",
    "n_measured": 700,
    "atypia_burden": 31,
    "atypia_burden_fraction": 31 / 800,
    "nc_threshold": 0.5,
    "min_nucleus_um": 10.0,
    "n_atypical_out_of_domain": 20,
    "nucleus_diameter_um": {"median": 8.5, "bin_edges": list(range(31)), "counts": [0] * 5 + [100] * 7 + [0] * 18},
}


def atypia_items(n: int, crop_uri: str) -> list[dict]:
    return [
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
            "crop_uri": crop_uri,
        }
        for i in range(n)
    ]


def test_report_without_cells_has_no_labelling_ui_and_nothing_external():
    empty = render_html(summary(n_cells=0, slide_call="no cells found"), None, [])
    assert "No cells found" in empty and "<script" not in empty and "export-labels" not in empty
    full = render_html(summary(**OOD), png_data_uri(np.zeros((4, 4, 3), np.uint8)), gallery(60))
    for needle in ("http://", "https://", "<script src", "<link"):
        assert needle not in full, needle  # self-contained: mailed or archived as one file
    assert full.count("<img") == 1 + 2 * 60 and full.count(" data-src=") == 2 * (60 - PAGE_SIZE)


def test_the_atypia_section_shows_burden_histogram_and_cells_out_of_domain_included():
    cells = atypia_items(3, png_data_uri(np.zeros((8, 8, 3), np.uint8)))
    page = render_html(summary(**OOD, morphometry=MORPH), None, gallery(4), cells)
    assert "id='atypia-gallery'" in page and page.count("class='atypia-cell") == 3
    assert page.count("class='atypia-cell ood'") == 1 and "31 cells" in page and "<svg id='size-histogram'" in page
    assert "N/C 0.70" in page and "nucleus 12.0 µm" in page
    assert "atypia-gallery" not in render_html(summary(**OOD), None, gallery(4))  # older summaries: no section


def synthetic_cell(rng, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A model-input-sized crop (stained cell, darker nucleus outlined in cyan, grain) and its saliency
    overlay. As PNG these are a little heavier than the CSF slide's real ones (about 33 and 30 KB of
    base64 against 28 KB), so a size bound that holds here holds there."""
    yy, xx = np.mgrid[:size, :size]
    cx, cy = rng.uniform(50, 78, 2)
    r = np.hypot(xx - cx, yy - cy)
    img = np.full((size, size, 3), (232, 230, 238), np.float32)
    img[r < 40] = (180, 150, 190)
    nucleus = r < rng.uniform(14, 22)
    img[nucleus] = (105, 85, 140)
    img += cv2.GaussianBlur(rng.normal(0, 14, (size, size, 3)).astype(np.float32), (0, 0), 0.8)
    crop = nucleus_outline(img.clip(0, 255).astype(np.uint8), nucleus)
    cam = cv2.applyColorMap((np.exp(-((r / 30) ** 2)) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return crop, (0.6 * crop + 0.4 * cam).astype(np.uint8)


def decoded(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_gallery_images_are_jpeg_and_the_nucleus_outline_stays_cyan():
    crop, cam = synthetic_cell(np.random.default_rng(1))
    for uri in (gallery_data_uri(crop), gallery_data_uri(cam), heatmap_data_uri(crop)):
        assert uri.startswith("data:image/jpeg;base64,") and decoded(uri).shape == crop.shape
    on = np.all(crop == CYAN, axis=-1)
    dist = np.linalg.norm(decoded(gallery_data_uri(crop))[on].astype(float) - CYAN, axis=-1)
    # 4:4:4 keeps the 1-px outline (on the CSF slide every outline pixel within 60 of cyan); chroma
    # subsampling (JPEG 4:2:0, lossy WebP) turns it grey-blue, ~120 away
    assert on.sum() > 50 and (dist <= 60).mean() >= 0.99
    assert image_data_uri(crop, "WEBP", 90).startswith("data:image/webp;base64,")


def test_a_500_cell_report_stays_under_its_size_bound():
    """Issue 17: report.html for --top 500 <= 15 MB. The page here has everything but the heat map, whose
    JPEG is 1.24 MB on the CSF slide (a thumbnail of at most 2048 px a side): 2 MB is kept for it, so the
    rest must fit in 13 MB. As PNG the same cells would take about 32 MB."""
    rng = np.random.default_rng(0)
    cells = [synthetic_cell(rng) for _ in range(20)]  # 20 distinct cells; size adds up the same reused
    crops = [(gallery_data_uri(crop), gallery_data_uri(cam)) for crop, cam in cells]
    assert np.mean([len(image_data_uri(crop, "PNG")) for crop, _ in cells]) > 28_000  # as heavy as the slide's
    items = gallery(500)
    for i, item in enumerate(items):
        item["crop_uri"], item["cam_uri"] = crops[i % len(crops)]
    page = render_html(summary(**OOD, morphometry=MORPH), None, items, atypia_items(24, crops[0][0]))
    assert page.count("data:image/jpeg;base64,") == 2 * 500 + 24 and "data:image/png" not in page
    assert len(page.encode("utf-8")) <= 13e6


def test_the_gallery_says_how_to_open_the_viewer():
    page = render_html(summary(**OOD), None, gallery(3))
    assert "id='viewer-hint'" in page and "<code>cytopipe view &lt;this folder&gt;</code>" in page
    assert "id='viewer-hint'" not in render_html(summary(n_cells=0, slide_call="no cells found"), None, [])
