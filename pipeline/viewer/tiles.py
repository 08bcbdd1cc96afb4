"""Deep Zoom tiles and cell crops cut on demand from the slide, each kept in a bounded LRU cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline.viewer.errors import ViewerError
from pipeline.wsi.crops import read_crops
from pipeline.wsi.readers import open_slide

TILE_SIZE = 254  # + 2 x overlap = 256, as OpenSlide's deepzoom example
OVERLAP = 1
JPEG_QUALITY = 75
CROP_MARGIN = 0.25  # the crop box of score-slide's gallery (slide.crop_margin's default)
CROP_MAX_PX = 192


class LRUCache:
    """A thread-safe map of at most `size` entries; the least recently used one goes first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: tiles are made in parallel; a rare duplicate is harmless
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class SlideTiles:
    """The slide's Deep Zoom pyramid (openslide's DeepZoomGenerator over level-0 coordinates, so that the
    image coordinates of the viewer are those of cells.csv) and per-cell crops."""

    def __init__(self, path: Path | str, cache_tiles: int = 2048, cache_crops: int = 512):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.path = Path(path)
        if not self.path.is_file():
            raise ViewerError(f"{self.path}: slide not found (pass --slide with the slide's path)")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ViewerError(f"{self.path}: cannot open the slide with OpenSlide ({reason})") from exc
        self._dz = DeepZoomGenerator(self._slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
        self.dimensions = self._slide.dimensions
        self.tiles = LRUCache(cache_tiles)
        self.crops = LRUCache(cache_crops)
        self._crop_lock = threading.Lock()
        self._crop_source = None

    def dzi(self) -> str:
        return self._dz.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The JPEG tile; ValueError when level, col or row is outside the pyramid."""
        if not 0 <= level < self._dz.level_count:
            raise ValueError(f"no level {level}")
        cols, rows = self._dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"no tile {col}_{row} at level {level}")
        return self.tiles.get_or_make((level, col, row), lambda: _jpeg(self._dz.get_tile(level, (col, row))))

    def crop(self, cell: dict) -> bytes:
        """The JPEG crop of one cell (a row of cells.csv), as score-slide's gallery cuts it."""
        return self.crops.get_or_make(cell["cell_id"], lambda: self._make_crop(cell))

    def _make_crop(self, cell: dict) -> bytes:
        from PIL import Image

        with self._crop_lock:
            if self._crop_source is None:
                self._crop_source = open_slide(self.path, mpp=1.0)  # crops need no microns
            (rgb,) = read_crops(self._crop_source, pd.DataFrame([cell]), CROP_MARGIN)
        image = Image.fromarray(rgb)
        image.thumbnail((CROP_MAX_PX, CROP_MAX_PX))
        return _jpeg(image)

    def close(self) -> None:
        self._slide.close()
        if self._crop_source is not None:
            self._crop_source.close()
