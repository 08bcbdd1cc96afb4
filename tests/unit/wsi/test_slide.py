"""Whole-slide reading and cell detection: synthetic pyramidal TIFFs, a plain field image,
broken files, and direct reads of reduced levels (the real CSF slide: tests/integration/test_real_slide.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import SlideConfig
from pipeline.wsi.crops import crop_box, read_crops
from pipeline.wsi.detection import CELL_COLUMNS, detect_slide
from pipeline.wsi.readers import SlideError, open_slide
from pipeline.wsi.segmentation import detect_cells
from pipeline.wsi.tiling import foreground_mask, foreground_regions
from tests.slides import BLOB, CELLS, DEBRIS, MPP, SIZE, TILE, draw_cells, glass, write_pyramid


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory) -> Path:
    img = draw_cells(glass(SIZE), CELLS, DEBRIS, BLOB)
    path = write_pyramid(tmp_path_factory.mktemp("slides") / "synthetic.tiff", img)
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count > 1
    return path


@pytest.fixture(scope="module")
def cfg() -> SlideConfig:
    return dataclasses.replace(SlideConfig(), tile_px=TILE)


def match(found: pd.DataFrame, truth, tol=8.0) -> list[int]:
    """Index of the detection at each true centre; each must be found exactly once."""
    xy = found[["x", "y"]].to_numpy(float)
    hits = []
    for cx, cy, r in truth:
        near = np.flatnonzero(np.hypot(xy[:, 0] - cx, xy[:, 1] - cy) <= tol)
        assert len(near) == 1, f"cell at ({cx}, {cy}) r={r}: {len(near)} detections within {tol} px"
        hits.append(int(near[0]))
    return hits


# --------------------------------------------------------------------------- synthetic slide


def test_open_synthetic_slide(synthetic_slide):
    with open_slide(synthetic_slide) as src:
        assert src.dimensions == SIZE
        assert src.level_count == 4
        assert src.mpp == pytest.approx(MPP)
        assert src.mpp_source == "slide properties"
        assert src.path == synthetic_slide

        region = src.read_region(290, 290, 20, 20)
        assert region.shape == (20, 20, 3) and region.dtype == np.uint8
        assert region.max() < 200  # inside cell 0's nucleus

        # Outside the slide OpenSlide gives transparent pixels: they must come back white.
        edge = src.read_region(SIZE[0] - 10, SIZE[1] - 10, 20, 20)
        assert (edge[10:, :] == 255).all() and (edge[:, 10:] == 255).all()
        assert edge[:10, :10].max() <= 250

        thumb, ds = src.thumbnail(2048)
        assert thumb.shape == (1200, 1500, 3) and ds == pytest.approx(2.0)
        # No level is that small: the smallest level is shrunk strip by strip.
        small, ds_small = src.thumbnail(100)
        assert max(small.shape[:2]) <= 100 and small.dtype == np.uint8
        assert ds_small == pytest.approx(SIZE[0] / small.shape[1])


def test_open_slide_without_mpp(tmp_path):
    path = write_pyramid(tmp_path / "nompp.tiff", glass((1024, 768)), mpp=None)
    with pytest.raises(SlideError, match=r"nompp\.tiff.*no mpp.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as src:
        assert src.mpp == 0.5 and src.mpp_source == "--mpp"
    for bad in (0, -1.0, float("nan"), "x"):
        with pytest.raises(SlideError, match="--mpp"):
            open_slide(path, mpp=bad)


def test_detect_slide_finds_each_cell_once(synthetic_slide, cfg):
    with open_slide(synthetic_slide) as src:
        cells = detect_slide(src, cfg, progress=False)
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert cells["cell_id"].tolist() == list(range(len(cells)))
    assert cells.sort_values(["y", "x"]).index.tolist() == list(range(len(cells)))
    assert len(cells) == len(CELLS), cells
    hits = match(cells, CELLS)
    for (cx, cy, r), i in zip(CELLS, hits):
        row = cells.iloc[i]
        # The touching pair shares its contact zone, so it gets a looser diameter check.
        assert row["diameter_um"] == pytest.approx(2 * r * MPP, rel=0.2)
        assert row["area_um2"] == pytest.approx(math.pi * (row["diameter_um"] / 2) ** 2, rel=1e-6)
        assert row["x0"] <= cx <= row["x1"] and row["y0"] <= cy <= row["y1"]
        assert row["x1"] - row["x0"] == pytest.approx(2 * r, abs=8)
    for col in ("x", "y", "x0", "y0", "x1", "y1", "cell_id"):
        assert pd.api.types.is_integer_dtype(cells[col])


def test_detect_slide_same_cells_with_any_tiling(synthetic_slide, cfg):
    # One tile covering the slide has no borders at all: the tiled result must match it.
    with open_slide(synthetic_slide) as src:
        tiled = detect_slide(src, cfg, progress=False)
        whole = detect_slide(src, dataclasses.replace(cfg, tile_px=4096), progress=False)
    pd.testing.assert_frame_equal(tiled, whole, check_exact=False, atol=2)


def test_foreground_mask_and_regions(synthetic_slide, cfg):
    with open_slide(synthetic_slide) as src:
        thumb, ds = src.thumbnail(cfg.mask_max_px)
        mask = foreground_mask(thumb)
        assert mask.dtype == bool and mask.shape == thumb.shape[:2]
        assert 0.005 < mask.mean() < 0.2
        for cx, cy, _ in CELLS:
            assert mask[int(cy / ds), int(cx / ds)]
        regions = foreground_regions(mask, ds, src.dimensions, TILE, 240)
    # Each of the 3x3 tiles holds a cell or part of one.
    assert len(regions) == 9
    for x, y, w, h in regions:
        assert x >= 0 and y >= 0 and x + w <= SIZE[0] and y + h <= SIZE[1]


def test_foreground_regions_grid():
    mask = np.zeros((1200, 1500), bool)
    dims = (3000, 2400)
    assert foreground_regions(mask, 2.0, dims, 1024, 240) == []
    mask[600, 750] = True  # level 0 (1500, 1200): core (1024, 1024)-(2048, 2048)
    assert foreground_regions(mask, 2.0, dims, 1024, 240) == [(784, 784, 1504, 1504)]
    mask[:] = False
    mask[0, 0] = mask[-1, -1] = True
    assert foreground_regions(mask, 2.0, dims, 1024, 240) == [(0, 0, 1264, 1264), (1808, 1808, 1192, 592)]


def test_blank_slide_has_no_cells(tmp_path, cfg):
    path = write_pyramid(tmp_path / "blank.tiff", glass((1600, 1200), seed=3))
    with open_slide(path) as src:
        thumb, _ = src.thumbnail(cfg.mask_max_px)
        assert foreground_mask(thumb).mean() < 0.01
        cells = detect_slide(src, cfg, progress=False)
        assert detect_cells(src.read_region(0, 0, 800, 800), MPP, cfg) == []
    assert cells.empty and list(cells.columns) == list(CELL_COLUMNS)


def test_detect_cells_on_region(cfg):
    img = draw_cells(glass((600, 500), seed=1), [(150, 150, 30), (400, 300, 40), (455, 300, 20)])
    cells = detect_cells(img, MPP, cfg)
    assert len(cells) == 3
    assert set(cells[0]) == {"cx", "cy", "x0", "y0", "x1", "y1", "diameter_um", "area_um2"}
    first = min(cells, key=lambda c: c["cx"])
    assert first["cx"] == pytest.approx(150, abs=1.5) and first["cy"] == pytest.approx(150, abs=1.5)
    assert first["diameter_um"] == pytest.approx(60 * MPP, rel=0.05)
    assert (first["x0"], first["y0"]) == (120, 120) and (first["x1"], first["y1"]) == (181, 181)


def test_crop_box():
    dims = (1000, 800)
    assert crop_box({"x0": 100, "y0": 100, "x1": 140, "y1": 120}, 0.25, dims) == (90, 80, 60, 60)
    # At the slide's edge the square is shifted inside, not shrunk.
    assert crop_box({"x0": 0, "y0": 790, "x1": 20, "y1": 800}, 0.25, dims) == (0, 770, 30, 30)
    # Only a crop bigger than the slide is clipped.
    assert crop_box({"x0": 0, "y0": 0, "x1": 20, "y1": 20}, 0.5, (30, 25)) == (0, 0, 30, 25)


def test_read_crops(synthetic_slide, cfg):
    with open_slide(synthetic_slide) as src:
        cells = detect_slide(src, cfg, progress=False)
        crops = read_crops(src, cells, cfg.crop_margin)
    assert len(crops) == len(cells)
    for crop, row in zip(crops, cells.itertuples()):
        long_side = max(row.x1 - row.x0, row.y1 - row.y0)
        assert crop.shape[0] == crop.shape[1] >= long_side and crop.shape[2] == 3
        # Centred cell on glass: dark centre, bright corners.
        c = crop.shape[0] // 2
        assert crop[c, c].min() < 200 and crop[0, 0].min() >= 235


# --------------------------------------------------------------------------- plain images, errors


def test_plain_png_field(tmp_path, cfg):
    img = draw_cells(glass((640, 480), seed=2), [(100, 100, 30), (400, 240, 36), (560, 400, 24)])
    path = tmp_path / "field.png"
    Image.fromarray(img).save(path)
    with pytest.raises(SlideError, match=r"field\.png.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=MPP) as src:
        assert src.dimensions == (640, 480) and src.level_count == 1 and src.mpp_source == "--mpp"
        region = src.read_region(-10, -10, 50, 50)
        assert (region[:10] == 255).all() and (region[10:, 10:] == img[:40, :40]).all()
        thumb, ds = src.thumbnail(256)
        assert thumb.shape == (192, 256, 3) and ds == pytest.approx(2.5)
        full, ds1 = src.thumbnail(2048)
        assert (full == img).all() and ds1 == 1.0
        cells = detect_slide(src, cfg, progress=False)
    assert len(cells) == 3
    match(cells, [(100, 100, 30), (400, 240, 36), (560, 400, 24)], tol=2)


def test_open_slide_errors(tmp_path, synthetic_slide):
    with pytest.raises(SlideError, match=r"missing\.tiff: not found"):
        open_slide(tmp_path / "missing.tiff")

    folder = tmp_path / "folder.tiff"
    folder.mkdir()
    with pytest.raises(SlideError, match=r"folder\.tiff: is a directory"):
        open_slide(folder)

    text = tmp_path / "notes.tiff"
    text.write_text("not a slide\n")
    with pytest.raises(SlideError, match=r"notes\.tiff: not a slide or image OpenSlide or PIL can read"):
        open_slide(text)

    data = synthetic_slide.read_bytes()
    for name, cut in (("half.tiff", len(data) // 2), ("tail.tiff", len(data) - 1000), ("head.tiff", 64)):
        broken = tmp_path / name
        broken.write_bytes(data[:cut])
        with pytest.raises(SlideError, match=name.replace(".", r"\.")) as info:
            open_slide(broken, mpp=MPP)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- direct reads of reduced levels


def _jpeg(tile: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _decode_jpeg(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_tiled_jpeg_level_assembles_tiles_clips_and_leaves_glass_white(tmp_path):
    """A region cut across tile borders, partly beyond the level, and over an empty tile (count 0)."""
    from pipeline.wsi.tiff_levels import TiledJpegLevel

    rng = np.random.default_rng(0)
    width, height, tile = 150, 100, 64  # 3 x 2 tiles, the last column and row partial
    # Flat 16 px blocks on JPEG's 16 px grid: chroma subsampling and the DCT keep them nearly exact.
    level = np.repeat(
        np.repeat(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8), 16, axis=0), 16, axis=1
    )[:height, :width]
    blobs, offsets, counts, pos = [], [], [], 0
    for ty in range(2):
        for tx in range(3):
            padded = np.full((tile, tile, 3), 255, np.uint8)
            part = level[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
            padded[: part.shape[0], : part.shape[1]] = part
            data = b"" if (tx, ty) == (2, 1) else _jpeg(padded)  # one tile the writer left empty
            blobs.append(data)
            offsets.append(pos)
            counts.append(len(data))
            pos += len(data)
    path = tmp_path / "tiles.bin"
    path.write_bytes(b"".join(blobs))
    reader = TiledJpegLevel(path, width, height, tile, tile, tuple(offsets), tuple(counts))
    decoded = np.concatenate(
        [
            np.concatenate(
                [
                    _decode_jpeg(blobs[ty * 3 + tx]) if counts[ty * 3 + tx] else np.full((tile, tile, 3), 255, np.uint8)
                    for tx in range(3)
                ],
                axis=1,
            )
            for ty in range(2)
        ]
    )[:height, :width]
    region = reader.read(40, 30, 140, 90)  # crosses both tile borders, runs past the right and bottom edges
    assert region.shape == (90, 140, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region[:70, :110], decoded[30:100, 40:150])
    assert (region[70:] == 255).all() and (region[:, 110:] == 255).all()  # beyond the level: white
    assert (region[64 - 30 : 70, 128 - 40 : 110] == 255).all()  # the empty tile reads as glass
    # Close to the source pixels (JPEG loss ~5 on saturated random colours; a misplaced tile gives ~80).
    assert np.abs(region[:34, :88].astype(int) - level[30:64, 40:128].astype(int)).mean() < 8
    assert (reader.read(-50, -50, 20, 20) == 255).all()


def test_uncompressed_pyramid_is_read_by_openslide_only(synthetic_slide):
    with open_slide(synthetic_slide) as src:
        assert src._direct == {}  # not JPEG: nothing to gain, OpenSlide reads every level
