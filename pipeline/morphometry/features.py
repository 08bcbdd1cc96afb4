"""Nuclear features per cell, from the masks of `segmentation.segment`.

Scale-free features (ratios, shapes, optical densities) mean the same in any image; sizes in µm need
the crop's physical scale (slides: the scanner's µm/px times the crop's resize factor) and are NaN
without it (plain image files, Herlev's rescaled crops).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.morphometry.segmentation import Masks, SegmentationSettings, count, masked_sum, segment

# Features that mean the same at any scale: what an image without a known µm/px gets, and what the
# logistic atypia model may use.
SCALE_FREE = (
    "nc_ratio",
    "nucleus_od",
    "nucleus_od_sd",
    "hyperchromasia",
    "nucleus_solidity",
    "nucleus_eccentricity",
    "contour_irregularity",
)
IN_MICROMETRES = ("nucleus_diameter_um", "nucleus_area_um2", "cell_area_um2")
COLUMNS = (*IN_MICROMETRES, *SCALE_FREE, "cell_clipped", "morph_reason")


def _moments_eccentricity(mask: np.ndarray) -> np.ndarray:
    """Eccentricity of the ellipse with the same second moments as each mask (0: a circle)."""
    n, s = mask.shape[0], mask.shape[1]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    m = mask.reshape(n, -1).astype(np.float64)
    area = np.maximum(m.sum(1), 1)
    y, x = yy.ravel(), xx.ravel()
    cy, cx = m @ y / area, m @ x / area
    vy = m @ (y * y) / area - cy**2
    vx = m @ (x * x) / area - cx**2
    cxy = m @ (x * y) / area - cx * cy
    root = np.sqrt(((vy - vx) / 2) ** 2 + cxy**2)
    major, minor = (vy + vx) / 2 + root, np.maximum((vy + vx) / 2 - root, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(np.clip(1 - minor / major, 0, 1))


def _contour_shape(nucleus: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(solidity, contour irregularity) per nucleus: area over its convex hull's area, and its outline's
    length over the hull's outline minus 1 (0 for a convex outline; notches and lobes raise it)."""
    import cv2

    solidity = np.full(len(nucleus), np.nan)
    irregularity = np.full(len(nucleus), np.nan)
    for i in np.flatnonzero(present):
        contours, _ = cv2.findContours(nucleus[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = max(contours, key=cv2.contourArea)
        hull = cv2.convexHull(outline)
        hull_area, area = cv2.contourArea(hull), float(nucleus[i].sum())
        solidity[i] = min(area / hull_area, 1.0) if hull_area > 0 else 1.0
        hull_length = cv2.arcLength(hull, True)
        irregularity[i] = max(cv2.arcLength(outline, True) / hull_length - 1, 0.0) if hull_length > 0 else 0.0
    return solidity, irregularity


def _masked_mean_sd(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = count(mask).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = masked_sum(values, mask) / n
        var = masked_sum(values * values, mask) / n - mean**2
    return mean, np.sqrt(np.clip(var, 0, None))


def features_from_masks(masks: Masks, um_per_px: np.ndarray | float | None = None) -> pd.DataFrame:
    """One row per crop: the COLUMNS. `um_per_px`: µm per pixel of the crops as segmented (per crop or
    one value), or None when unknown; µm columns are NaN then. Rows with a `morph_reason` have NaN
    nuclear features (and NaN cell area for a blank crop)."""
    n = len(masks.reason)
    has_cell = masks.reason != "no cell (blank crop)"
    usable = masks.reason == ""
    nucleus_px = count(masks.nucleus).astype(np.float64)
    cell_px = count(masks.cell).astype(np.float64)
    cytoplasm = masks.cell & ~masks.nucleus
    nucleus_od, _ = _masked_mean_sd(masks.od, masks.nucleus)
    cytoplasm_od, _ = _masked_mean_sd(masks.od, cytoplasm)
    haem_mean, haem_sd = _masked_mean_sd(masks.haematoxylin, masks.nucleus)
    solidity, irregularity = _contour_shape(masks.nucleus, usable)
    scale = np.full(n, np.nan) if um_per_px is None else np.broadcast_to(np.asarray(um_per_px, float), (n,))
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame(
            {
                "nucleus_diameter_um": 2 * np.sqrt(nucleus_px / np.pi) * scale,
                "nucleus_area_um2": nucleus_px * scale**2,
                "cell_area_um2": np.where(has_cell, cell_px * scale**2, np.nan),
                "nc_ratio": nucleus_px / cell_px,
                "nucleus_od": haem_mean,
                "nucleus_od_sd": haem_sd,
                # Nuclear OD over the cytoplasm's (floored at faint cytoplasm): > 1 is a darker nucleus.
                "hyperchromasia": nucleus_od / np.maximum(cytoplasm_od, 0.05),
                "nucleus_solidity": solidity,
                "nucleus_eccentricity": _moments_eccentricity(masks.nucleus),
                "contour_irregularity": irregularity,
            }
        )
    nuclear = [c for c in frame.columns if c != "cell_area_um2"]
    frame.loc[~usable, nuclear] = np.nan
    frame["cell_clipped"] = masks.cell_clipped & has_cell
    frame["morph_reason"] = masks.reason.astype(str)
    return frame


def measure(
    crops: np.ndarray,
    valid: np.ndarray | None = None,
    cell_hint: np.ndarray | None = None,
    um_per_px: np.ndarray | float | None = None,
    settings: SegmentationSettings = SegmentationSettings(),
    darkness_threshold: float | None = None,
    chunk: int = 256,
) -> tuple[pd.DataFrame, np.ndarray]:
    """(features, nucleus masks) for uint8 crops (n, s, s, 3), `chunk` crops at a time (memory stays
    ~60 MB at 128 px)."""
    parts, nuclei = [], []
    scale = None if um_per_px is None else np.broadcast_to(np.asarray(um_per_px, float), (len(crops),))
    for start in range(0, len(crops), chunk):
        part = slice(start, start + chunk)
        masks = segment(
            crops[part],
            None if valid is None else valid[part],
            None if cell_hint is None else cell_hint[part],
            settings,
            darkness_threshold,
        )
        parts.append(features_from_masks(masks, None if scale is None else scale[part]))
        nuclei.append(masks.nucleus)
    if not parts:
        s = crops.shape[1] if np.ndim(crops) == 4 else 0
        return pd.DataFrame({c: pd.Series(dtype=object if c == "morph_reason" else float) for c in COLUMNS}), np.zeros(
            (0, s, s), bool
        )
    return pd.concat(parts, ignore_index=True), np.concatenate(nuclei)
