"""The one place an image file is opened.

Every stage (ingest, training, inference) reads pixels through `load_rgb`, so the
size guards, mode conversions and error messages cannot drift apart. Greyscale, palette,
alpha (composited on white) and 16-bit images convert to RGB without loss; CMYK (common from
cameras, scanners and print workflows) is accepted too, with PIL's conversion.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import CytopipeError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})

# Modes that become RGB without losing information (16-bit is scaled to 8-bit, which
# is the precision every model input has anyway).
_LOSSLESS_MODES = frozenset({"RGB", "L", "LA", "RGBA", "P", "PA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I"})
# CMYK is not lossless, but it is a common camera/scanner/print format and PIL's conversion
# (naive, no ICC profile; Adobe's inverted JPEGs are handled) is close enough for a cell crop:
# accepted and converted, with the file's own mode kept in ImageInfo (and so in the manifest).
_CONVERTED_MODES = frozenset({"CMYK"})


class ImageError(CytopipeError, ValueError):
    """An image that cannot be used. `str()` is one line: '<path>: <reason>'."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str  # the file's own mode, before conversion to RGB


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_header(img: Image.Image, path: Path, limits: ImageLimits) -> None:
    width, height = img.size
    # Checked from the header, before any pixel is decoded.
    if width * height > limits.max_pixels:
        raise ImageError(
            path, f"{width}x{height} exceeds the {limits.max_pixels:,}-pixel limit (decompression-bomb guard)"
        )
    if min(width, height) < limits.min_side:
        raise ImageError(path, f"{width}x{height} is below the minimum side of {limits.min_side} px")
    if img.mode not in _LOSSLESS_MODES | _CONVERTED_MODES:
        raise ImageError(path, f"unsupported colour mode {img.mode} (no conversion to RGB)")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):
        # 16/32-bit greyscale: scale the full range of the type down to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        # Brightfield glass is white: composite transparent parts onto white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(stream: io.BytesIO, path: Path, limits: ImageLimits) -> tuple[Image.Image, ImageInfo]:
    with warnings.catch_warnings():
        # PIL warns (rather than raises) between max_pixels and 2x that; we raise ourselves.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except UnidentifiedImageError:
            raise ImageError(path, "not an image (format not recognised)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"decompression-bomb guard: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            # The bytes are in memory already, so this is the content, not the disk.
            raise ImageError(path, f"truncated or corrupt image ({exc})") from None
        info = ImageInfo(img.width, img.height, img.mode)
        _check_header(img, path, limits)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(path, f"truncated or corrupt image data ({exc})") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"decompression-bomb guard: {exc}") from None
    return _to_rgb(img), info


def read_bytes(path: Path | str) -> bytes:
    """Read a file's bytes, turning OS errors into one-line `ImageError`s."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError(path, "is a directory, not an image file")
        data = path.read_bytes()
    except ImageError:
        raise
    except FileNotFoundError:
        reason = "broken symlink" if path.is_symlink() else "file not found"
        raise ImageError(path, reason) from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def decode_rgb(data: bytes, path: Path | str, limits: ImageLimits = ImageLimits()) -> tuple[Image.Image, ImageInfo]:
    """Decode bytes already read from `path` into an RGB image plus the file's own info."""
    return _decode(io.BytesIO(data), Path(path), limits)


def load_rgb(path: Path | str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Open `path` as an RGB image, or raise `ImageError` with a one-line reason."""
    return decode_rgb(read_bytes(path), path, limits)[0]
