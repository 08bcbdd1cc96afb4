"""Synthetic slides for tests: glass, drawn cells (discs, every other one with a nucleus), debris,
and pyramidal TIFFs that OpenSlide reads as generic-tiff."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MPP = 0.25
SIZE = (3000, 2400)  # w, h of the synthetic slide
TILE = 1024  # core grid used by the tests: boundaries at x = 1024, 2048 and y = 1024, 2048

# (cx, cy, radius px). Several straddle a tile boundary; the last two touch each other.
CELLS = [
    (300, 300, 30),
    (1024, 500, 35),
    (2048, 1024, 40),
    (600, 1024, 25),
    (1500, 1500, 20),
    (2600, 600, 32),
    (400, 1900, 38),
    (1030, 2040, 28),
    (2700, 2100, 22),
    (1700, 300, 30),
    (2300, 1700, 30),
    (2355, 1700, 30),
]
# Not cells: specks below min_cell_um and a blob above max_cell_um (80 um across).
DEBRIS = [(1200, 1200, 4), (2500, 300, 3)]
BLOB = (512, 1536, 160)


def glass(size, seed=0) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(240, 251, (h, w, 3), dtype=np.uint8)


def draw_disc(img: np.ndarray, cx: float, cy: float, r: float, colour) -> None:
    y0, y1 = max(0, int(cy - r - 1)), min(img.shape[0], int(cy + r + 2))
    x0, x1 = max(0, int(cx - r - 1)), min(img.shape[1], int(cx + r + 2))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    img[y0:y1, x0:x1][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour


def draw_cells(img: np.ndarray, cells, debris=(), blob=None) -> np.ndarray:
    for i, (cx, cy, r) in enumerate(cells):
        draw_disc(img, cx, cy, r, (170, 120, 190))  # cytoplasm
        if i % 2 == 0:
            draw_disc(img, cx, cy, r / 2, (70, 40, 110))  # nucleus
    for cx, cy, r in debris:
        draw_disc(img, cx, cy, r, (60, 40, 90))
    if blob is not None:
        draw_disc(img, *blob, (150, 150, 200))
    return img


def write_pyramid(path: Path, level0: np.ndarray, mpp: float | None = MPP, compression: str | None = None) -> Path:
    """Tiled pyramidal TIFF, levels as successive IFDs (reduced ones flagged), as
    OpenSlide's generic-tiff reads it; resolution in px/cm gives openslide.mpp-x/y."""
    import tifffile

    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        level = level0
        while True:
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                subfiletype=0 if level is level0 else 1,
                compression=compression,
                **res,
            )
            if max(level.shape[:2]) <= 512:
                break
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return path
