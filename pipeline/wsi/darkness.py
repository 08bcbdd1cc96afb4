"""Darkness, the one pixel measure detection uses, and its threshold relative to the glass.

Shared by the foreground mask on a thumbnail and by cell segmentation on a tile.
"""

from __future__ import annotations

import numpy as np

# Threshold on darkness (255 - min RGB channel, which also rises with saturation), relative
# to the glass level: never below glass + _FLOOR (blank glass and its noise stay out), never
# above glass + _CEIL (in a field packed with cells Otsu would split nuclei from cytoplasm).
_FLOOR = 25.0
_CEIL = 50.0


def as_rgb(region: np.ndarray) -> np.ndarray:
    """The RGB channels of a uint8 (h, w, 3 or 4) image; ValueError for anything else."""
    arr = np.asarray(region)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    return arr[..., :3]


def darkness(rgb: np.ndarray) -> np.ndarray:
    """255 - min(R, G, B): high for dark and for saturated (stained) pixels, low on glass."""
    # Channel by channel: ndarray.min(axis=2) reduces over a 3-long strided axis, 9x slower here.
    return 255 - np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def darkness_threshold(dark: np.ndarray) -> float:
    """Otsu on darkness, clipped to [glass + _FLOOR, glass + _CEIL]."""
    from skimage.filters import threshold_otsu

    hist = np.bincount(dark.ravel(), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 255.0
    otsu = float(threshold_otsu(hist=hist)) if np.count_nonzero(hist) > 1 else float(np.argmax(hist))
    # Glass level: median of the darkness values at or below Otsu (the bright class).
    low = hist[: int(otsu) + 1]
    cum = np.cumsum(low)
    glass = float(np.searchsorted(cum, cum[-1] / 2)) if cum[-1] > 0 else 0.0
    return float(np.clip(otsu, glass + _FLOOR, glass + _CEIL))
