"""Per-cell crops: the square box around each detected cell, read one at a time or, for the
cells of one tile, cut from a single read of their joint bounding box."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.data.transforms import base_resize
from pipeline.wsi.readers import SlideSource


def crop_box(row, margin: float, dimensions: tuple[int, int]) -> tuple[int, int, int, int]:
    """Level-0 crop (x, y, w, h) for one cell: its bbox grown by `margin` x long side on each
    side, made square around the bbox centre (Herlev crops are single centred cells), then
    shifted, not shrunk, to lie inside the slide (clipped only if larger than the slide)."""
    x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
    width, height = (int(v) for v in dimensions)
    long_side = max(x1 - x0, y1 - y0, 1.0)
    side = int(math.ceil(long_side * (1 + 2 * margin)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x, y = int(round(cx - side / 2)), int(round(cy - side / 2))
    x = min(max(x, 0), max(width - side, 0))
    y = min(max(y, 0), max(height - side, 0))
    return x, y, min(side, width - x), min(side, height - y)


def crop_boxes(cells_df: pd.DataFrame, margin: float, dimensions: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """`crop_box` for every cell of cells_df, in order."""
    return [
        crop_box(row._asdict(), margin, dimensions)
        for row in cells_df[["x0", "y0", "x1", "y1"]].itertuples(index=False)
    ]


def iter_crops(source: SlideSource, cells_df: pd.DataFrame, margin: float) -> Iterator[np.ndarray]:
    """RGB crops one at a time, in cells_df order (constant memory for big slides)."""
    for x, y, w, h in crop_boxes(cells_df, margin, source.dimensions):
        yield source.read_region(x, y, w, h)


def read_crops(source: SlideSource, cells_df: pd.DataFrame, margin: float) -> list[np.ndarray]:
    """RGB crops for every cell in cells_df, in order."""
    return list(iter_crops(source, cells_df, margin))


_CROP_BLOCK = 256  # level-0 px, on the slide's own grid (the CSF slide's JPEG tiles are 256 px)


def _read_under(source: SlideSource, boxes, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """The level-0 pixels of `bounds` (x0, y0, x1, y1) wherever a box needs them; blocks of the
    slide's grid that no box touches stay white and are never read (or decoded). On the CSF slide the
    crops touch 44% of their tiles' area. Level 0 is never resampled, so the pixels under every box
    are those of one read of the whole bounding box."""
    bx0, by0, bx1, by1 = bounds
    b = _CROP_BLOCK
    out = np.full((by1 - by0, bx1 - bx0, 3), 255, np.uint8)
    col0, row0 = bx0 // b, by0 // b
    touched = np.zeros(((by1 - 1) // b - row0 + 1, (bx1 - 1) // b - col0 + 1), bool)
    for x, y, w, h in boxes:
        touched[y // b - row0 : (y + h - 1) // b - row0 + 1, x // b - col0 : (x + w - 1) // b - col0 + 1] = True
    for r in range(touched.shape[0]):
        cols = np.flatnonzero(touched[r])
        if not len(cols):
            continue
        runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)  # one read per run of touched blocks
        y0, y1 = max(by0, (row0 + r) * b), min(by1, (row0 + r + 1) * b)
        for run in runs:
            x0, x1 = max(bx0, (col0 + run[0]) * b), min(bx1, (col0 + run[-1] + 1) * b)
            out[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] = source.read_region(x0, y0, x1 - x0, y1 - y0)
    return out


def tile_crops(source: SlideSource, cells_df: pd.DataFrame, margin: float, size: int) -> np.ndarray:
    """Model-input crops (n, size, size, 3) uint8 for cells of one tile, cut from ONE level-0
    read of their joint bounding box: the same pixels as `read_crops`, far fewer reads."""
    boxes = crop_boxes(cells_df, margin, source.dimensions)
    if not boxes:
        return np.zeros((0, size, size, 3), np.uint8)
    bx0, by0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    bx1, by1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    region = _read_under(source, boxes, (bx0, by0, bx1, by1))
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        out[i] = base_resize(region[y - by0 : y - by0 + h, x - bx0 : x - bx0 + w], size)
    return out
