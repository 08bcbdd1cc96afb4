"""Morphometry of cells as the rest of the pipeline holds them: plain image files (predict, the REST
server, the morphometry stage) and a slide's crops (score-slide), with the atypia scores added.

Every function returns one row per input with the feature COLUMNS, `atypia_criteria`, `atypia_logistic`
(NaN without a fitted model) and `atypia` (the one `morphometry.atypia` chooses).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.morphometry.atypia import LogisticAtypia, criteria_score
from pipeline.morphometry.features import SCALE_FREE, measure
from pipeline.morphometry.inputs import cell_windows, plain_images_input, window_mask_in_crop
from pipeline.morphometry.segmentation import SegmentationSettings

ATYPIA_COLUMNS = ("atypia", "atypia_criteria", "atypia_logistic")
# What predict and the REST server report for a plain image: no µm without a physical scale.
IMAGE_COLUMNS = (*SCALE_FREE, "morph_reason", *ATYPIA_COLUMNS)


def with_atypia(features: pd.DataFrame, method: str = "criteria", logistic: LogisticAtypia | None = None):
    """`features` with the atypia columns; `method` names the one copied into `atypia`."""
    criteria = criteria_score(features)
    fitted = logistic.score(features) if logistic is not None else np.full(len(features), np.nan)
    if method == "logistic" and logistic is None:
        raise ValueError("morphometry.atypia is 'logistic' but the model has no fitted atypia model")
    return features.assign(
        atypia=fitted if method == "logistic" else criteria, atypia_criteria=criteria, atypia_logistic=fitted
    )


def measure_images(
    images: list[np.ndarray],
    size: int = 128,
    settings: SegmentationSettings = SegmentationSettings(),
    method: str = "criteria",
    logistic: LogisticAtypia | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """(features with atypia, nucleus masks at `size`) for RGB images of any size (scale unknown)."""
    crops, valid, _ = plain_images_input(list(images), size)
    features, nuclei = measure(crops, valid=valid, settings=settings)
    return with_atypia(features, method, logistic), nuclei


def measure_slide_crops(
    crops: np.ndarray,
    boxes,
    cell_boxes,
    mpp: float,
    size: int = 64,
    settings: SegmentationSettings = SegmentationSettings(),
    method: str = "criteria",
    logistic: LogisticAtypia | None = None,
    darkness_threshold: float | None = None,
    with_masks: bool = False,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """(features with atypia, nucleus masks in crop pixels when `with_masks`, else None) for a slide's model crops (n, s, s, 3), cut at
    level-0 `boxes` (x, y, w, h) around cells with level-0 bounding boxes `cell_boxes` (x0, y0, x1, y1);
    `mpp`: the slide's µm per level-0 pixel; `darkness_threshold`: the one cell detection used on this slide.
    Each cell is segmented in its own window of its crop, resized to `size` (cell_windows)."""
    crops = np.asarray(crops)
    windows = cell_windows(crops, boxes, cell_boxes, size)
    features, nuclei = measure(
        windows.pixels,
        valid=windows.valid,
        cell_hint=windows.hint,
        um_per_px=windows.level0_per_px * mpp,
        settings=settings,
        darkness_threshold=darkness_threshold,
    )
    if not with_masks:
        return with_atypia(features, method, logistic), None
    side = crops.shape[1] if len(crops) else size
    in_crops = np.zeros((len(crops), side, side), bool)
    for i, (mask, bounds) in enumerate(zip(nuclei, windows.bounds)):
        in_crops[i] = window_mask_in_crop(mask, bounds, side)
    return with_atypia(features, method, logistic), in_crops


def nucleus_outline(image: np.ndarray, nucleus: np.ndarray, colour=(0, 200, 255)) -> np.ndarray:
    """A copy of `image` with the nucleus mask's outline drawn on it (the mask is scaled to the image)."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    if not nucleus.any():
        return out
    mask = cv2.resize(nucleus.astype(np.uint8), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, max(1, out.shape[0] // 128))
    return out
