"""Opening a slide and reading its pixels.

`open_slide` gives one `SlideSource` over anything OpenSlide reads (pyramidal slides) and
over plain field images (PNG/JPEG/TIFF/BMP, one in-memory level). Reads are RGB, with areas
outside the slide (or transparent) white, like glass.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from pipeline.data.images import ImageError, load_rgb
from pipeline.errors import CytopipeError
from pipeline.wsi.tiff_levels import direct_levels

# Rows of the smallest level read at once when no level is small enough for a thumbnail.
_STRIP_ROWS = 1024


class SlideError(CytopipeError, RuntimeError):
    """A slide that cannot be used. `str()` is one line: '<path>: <reason>'."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class SlideSource:
    """A slide (or field image) with a pyramid of levels; level 0 is full resolution."""

    path: Path
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    mpp: float
    mpp_source: str

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 (h, w, 3). (x, y) are level-0 coordinates, (w, h) pixels of `level`.
        Areas outside the slide (or transparent) are white, like glass."""
        if w <= 0 or h <= 0:
            raise ValueError(f"read_region: empty size {w}x{h}")
        if not 0 <= level < self.level_count:
            raise ValueError(f"read_region: level {level} not in 0..{self.level_count - 1}")
        return self._read(int(x), int(y), int(level), int(w), int(h))

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """(RGB image, level-0 pixels per thumbnail pixel) of the whole slide, long side <= max_px."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "SlideSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.path} {w}x{h} levels={self.level_count} mpp={self.mpp:g}>"


class _OpenSlideSource(SlideSource):
    def __init__(self, path: Path, slide):
        self.path = path
        self._slide = slide
        self.dimensions = tuple(int(v) for v in slide.dimensions)
        self.level_count = int(slide.level_count)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.properties = dict(slide.properties)
        # The levels of a tiled-JPEG TIFF are cut from their own tiles: OpenSlide resamples those above 0
        # by a non-integer downsample (12x slower) and reads level 0 4x slower (pipeline/wsi/tiff_levels.py).
        self._direct = {}
        if self.properties.get("openslide.vendor") == "generic-tiff":
            self._direct = direct_levels(path, self.level_dimensions)

    def _read(self, x, y, level, w, h):
        import openslide

        direct = self._direct.get(level)
        if direct is not None:
            ds = self.level_downsamples[level]
            try:
                return direct.read(int(round(x / ds)), int(round(y / ds)), w, h)
            except (OSError, ValueError) as exc:  # PIL raises OSError for a corrupt JPEG tile
                raise SlideError(
                    self.path, f"cannot read region ({x}, {y}) {w}x{h} at level {level}: {_one_line(exc)}"
                ) from None
        try:
            rgba = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                self.path, f"cannot read region ({x}, {y}) {w}x{h} at level {level}: {_one_line(exc)}"
            ) from None
        return _composite_white(rgba)

    def thumbnail(self, max_px):
        for level, (lw, lh) in enumerate(self.level_dimensions):
            if max(lw, lh) <= max_px:
                return self._read(0, 0, level, lw, lh), self.level_downsamples[level]
        # No level is small enough: shrink the smallest level strip by strip, never whole.
        from PIL import Image

        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        factor = math.ceil(max(lw, lh) / max_px)
        step = _STRIP_ROWS * factor
        ds = self.level_downsamples[level]
        strips = []
        for ly in range(0, lh, step):
            rows = min(step, lh - ly)
            strip = self._read(0, round(ly * ds), level, lw, rows)
            strips.append(np.asarray(Image.fromarray(strip).reduce(factor)))
        thumb = np.concatenate(strips, axis=0)
        return thumb, self.dimensions[0] / thumb.shape[1]

    def close(self):
        self._slide.close()


class _ImageSource(SlideSource):
    def __init__(self, path: Path, rgb: np.ndarray):
        self.path = path
        self._rgb = rgb
        h, w = rgb.shape[:2]
        self.dimensions = (w, h)
        self.level_count = 1
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.properties = {}

    def _read(self, x, y, level, w, h):
        out = np.full((h, w, 3), 255, np.uint8)
        iw, ih = self.dimensions
        sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if sx0 < sx1 and sy0 < sy1:
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = self._rgb[sy0:sy1, sx0:sx1]
        return out

    def thumbnail(self, max_px):
        from PIL import Image

        w, h = self.dimensions
        if max(w, h) <= max_px:
            return self._rgb.copy(), 1.0
        scale = max_px / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        thumb = np.asarray(Image.fromarray(self._rgb).resize(size, Image.Resampling.BOX))
        return thumb, w / size[0]


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied, as openslide-python returns it) over white."""
    import cv2

    if not rgba.size:
        return np.ascontiguousarray(rgba[..., :3])
    rgba = np.ascontiguousarray(rgba)
    # OpenCV's channel extraction and RGBA->RGB: 2.6 ms for a 1144x1264 read, 14 with numpy's
    # strided min and copy (the slide's crops read ~440 megapixels).
    if cv2.extractChannel(rgba, 3).min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _resolve_mpp(path: Path, properties: dict[str, str], mpp: float | None) -> tuple[float, str]:
    if mpp is not None:
        try:
            value = float(mpp)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise SlideError(path, f"--mpp must be a positive number of microns per pixel, got {mpp!r}")
        return value, "--mpp"
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(properties.get(key, "nan"))
        except ValueError:
            continue
        if math.isfinite(v) and v > 0:
            values.append(v)
    if not values:
        raise SlideError(path, "has no mpp (microns per pixel) in its properties; pass --mpp")
    # Anisotropic pixels are rare; the mean is what equivalent diameters need.
    return sum(values) / len(values), "slide properties"


def open_slide(path: Path | str, mpp: float | None = None) -> SlideSource:
    """Open a whole slide (anything OpenSlide reads) or a plain field image.

    Raises SlideError (one line naming the file) for a missing path, a directory, an
    unreadable or corrupt file, or a slide with no mpp when `mpp` is not given."""
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(path, "broken symlink" if path.is_symlink() else "not found")
    if path.is_dir():
        raise SlideError(path, "is a directory, not a slide")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        slide = None
    except openslide.OpenSlideError as exc:
        # OpenSlide knows the format but the file is broken: PIL would do no better.
        raise SlideError(path, f"truncated or corrupt slide ({_one_line(exc)})") from None
    except OSError as exc:
        raise SlideError(path, f"cannot read: {exc.strerror or exc}") from None

    if slide is not None:
        source = _OpenSlideSource(path, slide)
        try:
            _probe(source)
            source.mpp, source.mpp_source = _resolve_mpp(path, source.properties, mpp)
        except BaseException:
            source.close()
            raise
        return source

    try:
        # PIL warns about the truncation or bad EXIF it then fails on: the error says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # A plain field image is small; load_rgb's pixel guard keeps it that way.
            rgb = np.asarray(load_rgb(path))
    except ImageError as exc:
        reason = exc.reason
        if reason.startswith("not an image"):
            reason = "not a slide or image OpenSlide or PIL can read"
        raise SlideError(path, reason) from None
    source = _ImageSource(path, rgb)
    source.mpp, source.mpp_source = _resolve_mpp(path, source.properties, mpp)
    return source


def _probe(source: _OpenSlideSource) -> None:
    """Read one pixel at the far corner of the first and last levels: a truncated file
    fails here, at open, rather than half-way through a slide."""
    for level in {0, source.level_count - 1}:
        lw, lh = source.level_dimensions[level]
        ds = source.level_downsamples[level]
        source._read(int((lw - 1) * ds), int((lh - 1) * ds), level, 1, 1)
        source._read(0, 0, level, 1, 1)
