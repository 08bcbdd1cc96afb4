"""Whole-slide reading and cell detection on the real CSF slide in ../shared/data/slides: a region
of it, and direct reads of its reduced levels against OpenSlide's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SlideConfig
from pipeline.wsi.crops import crop_box, read_crops
from pipeline.wsi.readers import open_slide
from pipeline.wsi.segmentation import detect_cells
from pipeline.wsi.tiling import foreground_mask, foreground_regions
from tests.conftest import SHARED_DATA

REAL_SLIDE = SHARED_DATA / "slides" / "csf-breast-carcinoma-pap.tiff"


# --------------------------------------------------------------------------- the real slide


@pytest.fixture(scope="module")
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.fail(f"reference slide missing: {REAL_SLIDE} (tests need ../shared/data from the project root)")
    return REAL_SLIDE


def test_real_slide_region(real_slide):
    cfg = SlideConfig()
    with open_slide(real_slide) as src:
        assert src.mpp == 0.25 and src.mpp_source == "slide properties"
        assert src.dimensions == (27740, 28423) and src.level_count == 6
        thumb, ds = src.thumbnail(cfg.mask_max_px)
        assert max(thumb.shape[:2]) <= cfg.mask_max_px and ds == pytest.approx(16, rel=0.01)
        mask = foreground_mask(thumb)
        assert 0.02 < mask.mean() < 0.8

        # The most covered 2048 px tile.
        regions = foreground_regions(mask, ds, src.dimensions, 2048, 0)
        assert regions

        def coverage(r):
            x, y, w, h = (int(v / ds) for v in r)
            return mask[y : y + h, x : x + w].mean()

        x, y, w, h = max(regions, key=coverage)
        assert (w, h) == (2048, 2048)
        pixels = src.read_region(x, y, w, h)
        cells = detect_cells(pixels, src.mpp, cfg)
        assert len(cells) > 5
        diameters = np.array([c["diameter_um"] for c in cells])
        assert ((diameters >= cfg.min_cell_um) & (diameters <= cfg.max_cell_um)).all()
        assert np.mean((diameters >= 5) & (diameters <= 30)) >= 0.8

        frame = pd.DataFrame(cells)
        frame[["x0", "x1"]] += x
        frame[["y0", "y1"]] += y
        W, H = src.dimensions
        for row in frame.to_dict("records"):
            bx, by, bw, bh = crop_box(row, cfg.crop_margin, src.dimensions)
            assert 0 <= bx and 0 <= by and bx + bw <= W and by + bh <= H and bw == bh > 0
        crops = read_crops(src, frame.head(5), cfg.crop_margin)
        assert len(crops) == min(5, len(frame)) and all(c.ndim == 3 for c in crops)


def test_real_slide_reduced_levels_match_openslide(real_slide):
    """Levels 1-5 of the CSF slide are cut from their own JPEG tiles: the same pixels as OpenSlide's
    where it does not resample (the origin), within its sub-pixel resampling elsewhere, and the cells
    found on a level-1 tile agree with those found on OpenSlide's read."""
    from pipeline.wsi.detection import detection_level
    from pipeline.wsi.readers import _composite_white

    cfg = SlideConfig()
    with open_slide(real_slide) as src:
        assert sorted(src._direct) == [0, 1, 2, 3, 4, 5]
        for x, y in ((0, 0), (12345, 6789), (27700, 28400)):  # level 0: OpenSlide's pixels, bit for bit
            ours = src.read_region(x, y, 300, 257)
            theirs = _composite_white(np.asarray(src._slide.read_region((x, y), 0, (300, 257))))
            np.testing.assert_array_equal(ours, theirs)
        for level in (1, 4):
            ours = src.read_region(0, 0, 300, 200, level=level)
            theirs = _composite_white(np.asarray(src._slide.read_region((0, 0), level, (300, 200))))
            np.testing.assert_array_equal(ours, theirs)
        level = detection_level(src, cfg)
        assert level == 1
        x, y, w, h = 12000, 12000, 1144, 1144  # level-1 pixels of a region with cells
        ours = src.read_region(x, y, w, h, level=level)
        theirs = _composite_white(np.asarray(src._slide.read_region((x, y), level, (w, h))))
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 1.5
        mpp = src.mpp * src.level_downsamples[level]
        found = [pd.DataFrame(detect_cells(p, mpp, cfg)) for p in (ours, theirs)]
        assert len(found[1]) > 20
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(found[0][["cx", "cy"]].to_numpy()).query(found[1][["cx", "cy"]].to_numpy())
        assert np.mean(dist * mpp <= 4.0) >= 0.95
