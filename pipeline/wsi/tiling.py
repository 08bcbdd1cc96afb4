"""Where to look on a slide: a foreground mask on a thumbnail and the grid of tiles it touches.

Each tile is a core of the grid plus an overlap of one maximum cell diameter, so a cell on a
core border is read whole by the tile whose core holds its centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.wsi.darkness import as_rgb, darkness, darkness_threshold


def foreground_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean mask of cells/tissue on a thumbnail; blank glass gives (nearly) all False."""
    from scipy import ndimage

    rgb = as_rgb(thumbnail)
    dark = darkness(rgb)
    mask = dark > darkness_threshold(dark)
    # Grow by a pixel so that pale rims of cells at the mask's edge still select their tile.
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))


@dataclass(frozen=True)
class Tile:
    """One detection tile: the cells it keeps lie in its core; it reads its whole region."""

    core: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), level 0
    region: tuple[int, int, int, int]  # x, y, w, h: the core plus overlap, clipped


def foreground_tiles(
    mask: np.ndarray, downsample: float, dimensions: tuple[int, int], tile_px: int, overlap_px: int
) -> list[Tile]:
    """The tiles whose tile_px grid core touches the mask (`downsample`: level-0 pixels per mask
    pixel), each with its core grown by overlap_px and clipped to the slide. Row-major order."""
    if tile_px <= 0:
        raise ValueError(f"tile_px must be positive, got {tile_px}")
    width, height = (int(v) for v in dimensions)
    mh, mw = mask.shape
    tiles = []
    for y0 in range(0, height, tile_px):
        y1 = min(y0 + tile_px, height)
        my0, my1 = int(y0 / downsample), min(mh, max(int(y0 / downsample) + 1, math.ceil(y1 / downsample)))
        for x0 in range(0, width, tile_px):
            x1 = min(x0 + tile_px, width)
            mx0, mx1 = int(x0 / downsample), min(mw, max(int(x0 / downsample) + 1, math.ceil(x1 / downsample)))
            if not mask[my0:my1, mx0:mx1].any():
                continue
            rx0, ry0 = max(0, x0 - overlap_px), max(0, y0 - overlap_px)
            rx1, ry1 = min(width, x1 + overlap_px), min(height, y1 + overlap_px)
            tiles.append(Tile((x0, y0, x1, y1), (rx0, ry0, rx1 - rx0, ry1 - ry0)))
    return tiles


def foreground_regions(
    mask: np.ndarray, downsample: float, dimensions: tuple[int, int], tile_px: int, overlap_px: int
) -> list[tuple[int, int, int, int]]:
    """Level-0 regions (x, y, w, h): tile_px grid cores touching the mask, each grown by
    overlap_px on every side and clipped to the slide. Row-major order."""
    return [t.region for t in foreground_tiles(mask, downsample, dimensions, tile_px, overlap_px)]
