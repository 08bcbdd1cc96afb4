"""Every cell on a slide: plan the tiles and one slide-wide threshold, segment each tile, keep
a cell only in the tile whose core holds its centroid, and gather the slide's cell table."""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.concurrency import in_order
from pipeline.config import SlideConfig
from pipeline.wsi.darkness import darkness, darkness_threshold
from pipeline.wsi.readers import SlideSource
from pipeline.wsi.segmentation import segment_region
from pipeline.wsi.tiling import Tile, foreground_mask, foreground_tiles

CELL_COLUMNS = ("cell_id", "x", "y", "x0", "y0", "x1", "y1", "diameter_um", "area_um2")
# Detect on the coarsest level where the smallest cell still spans this many pixels.
_MIN_CELL_PX = 8.0


def detection_level(source: SlideSource, cfg: SlideConfig) -> int:
    """Coarsest level where the smallest cell still spans _MIN_CELL_PX pixels."""
    best = 0
    for level, ds in enumerate(source.level_downsamples):
        if cfg.min_cell_um / (source.mpp * ds) >= _MIN_CELL_PX:
            best = level
    return best


def _empty_cells() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype="int64") for c in CELL_COLUMNS})
    return df.astype({"diameter_um": "float64", "area_um2": "float64"})


@dataclass(frozen=True)
class DetectionPlan:
    """What every tile's detection shares: the tiles, one slide-wide threshold, the level."""

    tiles: list[Tile]
    threshold: float
    level: int
    downsample: float
    level_mpp: float


def plan_detection(source: SlideSource, cfg: SlideConfig, level: int | None = None) -> DetectionPlan:
    """Foreground tiles and the darkness threshold, from a thumbnail of the whole slide."""
    thumb, thumb_ds = source.thumbnail(cfg.mask_max_px)
    # One threshold for the whole slide keeps the segmentation of a cell in the overlap
    # of two tiles identical in both, so the core rule counts it exactly once.
    threshold = darkness_threshold(darkness(thumb))
    mask = foreground_mask(thumb)
    overlap = math.ceil(cfg.max_cell_um / source.mpp)
    tiles = foreground_tiles(mask, thumb_ds, source.dimensions, cfg.tile_px, overlap)
    level = detection_level(source, cfg) if level is None else int(level)
    ds = source.level_downsamples[level]
    return DetectionPlan(tiles, threshold, level, ds, source.mpp * ds)


def read_tile(source: SlideSource, plan: DetectionPlan, tile_no: int) -> np.ndarray:
    """The detection-level pixels of one tile (core + overlap)."""
    rx, ry, rw, rh = plan.tiles[tile_no].region
    ds = plan.downsample
    return source.read_region(rx, ry, max(1, math.ceil(rw / ds)), max(1, math.ceil(rh / ds)), level=plan.level)


def detect_tile(
    source: SlideSource, plan: DetectionPlan, tile_no: int, cfg: SlideConfig, pixels: np.ndarray | None = None
) -> pd.DataFrame | None:
    """Cells whose centroid lies in one tile's core (level-0 coordinates), or None."""
    if pixels is None:
        pixels = read_tile(source, plan, tile_no)
    return _tile_cells(
        pixels, plan.tiles[tile_no], tile_no, plan.downsample, plan.level_mpp, cfg, plan.threshold, source.dimensions
    )


def finish_cells(
    parts: list[pd.DataFrame | None], source: SlideSource, cfg: SlideConfig
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-tile cells -> the slide's cell table, and for each of its rows the position of that
    cell in the concatenated parts (so values computed per tile can follow the cells).

    Border duplicates are dropped; cell_id is 0..n-1 sorted by y then x."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return _empty_cells(), np.zeros(0, np.int64)
    cells = pd.concat(parts, ignore_index=True)
    cells["_row"] = np.arange(len(cells), dtype=np.int64)
    cells = _drop_border_duplicates(cells, radius=cfg.min_cell_um / 2 / source.mpp)
    width, height = source.dimensions
    cells["x"] = cells["x"].round().astype(np.int64).clip(0, width - 1)
    cells["y"] = cells["y"].round().astype(np.int64).clip(0, height - 1)
    cells = cells.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    cells.insert(0, "cell_id", np.arange(len(cells), dtype=np.int64))
    return cells[list(CELL_COLUMNS)], cells["_row"].to_numpy()


def detect_slide(
    source: SlideSource, cfg: SlideConfig, progress: bool | None = None, level: int | None = None
) -> pd.DataFrame:
    """Detect every cell on a slide. Columns: cell_id (0..n-1, sorted by y then x), x, y
    (level-0 centroid), x0, y0, x1, y1 (level-0 bbox, x1/y1 exclusive), diameter_um, area_um2.

    `level`: pyramid level to segment on (default: `detection_level`); coordinates are
    always level 0."""
    from tqdm import tqdm

    plan = plan_detection(source, cfg, level)
    tiles = plan.tiles
    parts = []
    bar = tqdm(
        total=len(tiles),
        desc=f"cells {source.path.name}",
        unit="tile",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    # Decode the next tile in a thread (OpenSlide releases the GIL) while this one is segmented.
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        reads = in_order(pool, lambda i: read_tile(source, plan, i), range(len(tiles)), ahead=1)
        for tile_no, pixels in enumerate(reads):
            parts.append(detect_tile(source, plan, tile_no, cfg, pixels))
            bar.update()
    return finish_cells(parts, source, cfg)[0]


def _tile_cells(
    pixels: np.ndarray,
    tile: Tile,
    tile_no: int,
    ds: float,
    level_mpp: float,
    cfg: SlideConfig,
    threshold: float,
    dimensions: tuple[int, int],
) -> pd.DataFrame | None:
    """Cells of one tile whose centroid lies in its core, in level-0 coordinates."""
    rx, ry = tile.region[:2]
    found = segment_region(pixels, level_mpp, cfg, threshold)
    if not len(found["cx"]):
        return None
    # Pixel i of the level covers level-0 [i*ds, (i+1)*ds): its centre is (i+0.5)*ds.
    x = rx + (found["cx"] + 0.5) * ds - 0.5
    y = ry + (found["cy"] + 0.5) * ds - 0.5
    cx0, cy0, cx1, cy1 = tile.core
    inside = (x >= cx0) & (x < cx1) & (y >= cy0) & (y < cy1)
    if not inside.any():
        return None
    area_um2 = found["area_px"][inside] * level_mpp * level_mpp
    width, height = dimensions
    return pd.DataFrame(
        {
            "x": x[inside],
            "y": y[inside],
            "x0": rx + np.floor(found["x0"][inside] * ds).astype(np.int64),
            "y0": ry + np.floor(found["y0"][inside] * ds).astype(np.int64),
            # Clipped here, not at the end, so a tile's crops are final as soon as it is detected.
            "x1": np.minimum(rx + np.ceil(found["x1"][inside] * ds).astype(np.int64), width),
            "y1": np.minimum(ry + np.ceil(found["y1"][inside] * ds).astype(np.int64), height),
            "diameter_um": np.sqrt(4 * area_um2 / math.pi),
            "area_um2": area_um2,
            "_tile": tile_no,
        }
    )


def _drop_border_duplicates(cells: pd.DataFrame, radius: float) -> pd.DataFrame:
    """Safety net for the core rule: a cell found by two tiles (their segmentations differed
    slightly near a border) within `radius` of itself is kept once."""
    from scipy.spatial import cKDTree

    if cells["_tile"].nunique() < 2:
        return cells.drop(columns="_tile").reset_index(drop=True)
    pairs = cKDTree(cells[["x", "y"]].to_numpy()).query_pairs(radius, output_type="ndarray")
    if len(pairs):
        tiles = cells["_tile"].to_numpy()
        pairs = pairs[tiles[pairs[:, 0]] != tiles[pairs[:, 1]]]
        cells = cells.drop(index=np.unique(pairs.max(axis=1)))
    return cells.drop(columns="_tile").reset_index(drop=True)
