"""Cells in one RGB region: a darkness threshold, hole filling, speck removal and a
distance-transform watershed that splits touching cells, then per-cell measures."""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import SlideConfig
from pipeline.wsi.darkness import as_rgb, darkness, darkness_threshold


def _distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each mask pixel to the nearest background pixel (float32).

    OpenCV's precise mask is Felzenszwalb's exact transform: equal to scipy's distance_transform_edt
    on the slide's tiles (max difference 0.0) and ~70x faster on a 1264 px tile here."""
    import cv2

    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def segment_region(region: np.ndarray, mpp: float, cfg: SlideConfig, threshold: float | None) -> dict[str, np.ndarray]:
    """Vectorised detection: arrays cx, cy, x0, y0, x1, y1, area_px (region pixels)."""
    rgb = as_rgb(region)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    dark = darkness(rgb)
    if threshold is None:
        threshold = darkness_threshold(dark)
    if float(dark.max(initial=0)) <= threshold:
        return _no_cells()

    min_d_px = cfg.min_cell_um / mpp
    max_d_px = cfg.max_cell_um / mpp
    # No smoothing: it would close the thin bright gaps between touching cells, which
    # are what lets the watershed split them; specks go with the size filter below.
    mask = dark > threshold
    _fill_round_holes(mask, mpp, max_d_px)
    mask = _drop_specks(mask, min_d_px)
    if mask is None:
        return _no_cells()
    labels = _split_touching(mask, min_d_px)
    return _measure(labels, min_d_px, max_d_px)


def _no_cells() -> dict[str, np.ndarray]:
    empty = {k: np.zeros(0, np.int64) for k in ("x0", "y0", "x1", "y1")}
    empty.update(cx=np.zeros(0), cy=np.zeros(0), area_px=np.zeros(0))
    return empty


def _fill_round_holes(mask: np.ndarray, mpp: float, max_d_px: float) -> None:
    """Fill holes (pale nuclei, vacuoles) in `mask`, in place, but not the thin bright gaps that a
    cluster of touching cells encloses: those separate the cells. A hole is filled when it is round
    (area close to pi * depth^2, where a network of gaps is far bigger than its depth says) and at
    least 3 um across, since gaps often break into pinholes that must stay open."""
    from scipy import ndimage

    holes, n_holes = ndimage.label(~mask)
    if not n_holes:
        return
    sizes = np.bincount(holes.ravel(), minlength=n_holes + 1)
    min_depth = 1.5 / mpp
    cand = (sizes <= math.pi * (max_d_px / 4) ** 2) & (sizes >= math.pi * min_depth**2)
    cand[0] = False
    # Background touching the region's border is glass, not a hole.
    cand[np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])] = False
    boxes = ndimage.find_objects(holes) if cand.any() else []
    for hole_id in np.flatnonzero(cand):
        box = boxes[hole_id - 1]
        # depth <= half the short side of the box: skip the EDT where that already fails.
        half = min(box[0].stop - box[0].start, box[1].stop - box[1].start) / 2
        if half < min_depth or sizes[hole_id] > 2.5 * math.pi * half**2:
            continue
        inside = np.pad(holes[box] == hole_id, 1)
        depth = float(_distance(inside).max())
        if depth >= min_depth and sizes[hole_id] <= 2.5 * math.pi * depth**2:
            mask[box] |= inside[1:-1, 1:-1]


def _drop_specks(mask: np.ndarray, min_d_px: float) -> np.ndarray | None:
    """`mask` without components under half the area of the smallest cell; None when none is left."""
    from scipy import ndimage

    comps, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    keep = sizes >= math.pi * (min_d_px / 2) ** 2 / 2
    keep[0] = False
    if not keep.any():
        return None
    return keep[comps]


def _split_touching(mask: np.ndarray, min_d_px: float) -> np.ndarray:
    """Labels of the mask's components, those with two or more distance peaks split by a watershed."""
    import cv2
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    comps, n = ndimage.label(mask)
    dist = _distance(mask)
    # Smooth the distance map so irregular outlines do not spawn extra peaks (scipy's gaussian_filter:
    # 4-sigma kernel, mirrored border; OpenCV's is the same filter, 4x faster here).
    dist_s = cv2.GaussianBlur(dist, (0, 0), max(1.0, min_d_px / 4), borderType=cv2.BORDER_REFLECT)
    peaks = peak_local_max(
        dist_s, min_distance=max(1, int(round(min_d_px))), threshold_abs=min_d_px / 4, exclude_border=False
    )
    peak_comp = comps[peaks[:, 0], peaks[:, 1]]
    peaks, peak_comp = peaks[peak_comp > 0], peak_comp[peak_comp > 0]
    n_peaks = np.bincount(peak_comp, minlength=n + 1)
    # Only components with two or more peaks need the watershed; a component with one
    # peak, or none (too thin, or its peak suppressed by a bigger neighbour), is one cell.
    split = n_peaks >= 2
    split[0] = False
    labels = comps.copy()
    if split.any():
        on_split = split[peak_comp]
        markers = np.zeros(mask.shape, np.int32)
        markers[peaks[on_split, 0], peaks[on_split, 1]] = n + 1 + np.arange(on_split.sum(), dtype=np.int32)
        ws_mask = split[comps]
        pieces = watershed(-dist_s, markers, mask=ws_mask)
        labels[ws_mask] = pieces[ws_mask]
    return labels


def _measure(labels: np.ndarray, min_d_px: float, max_d_px: float) -> dict[str, np.ndarray]:
    """Centroid, bbox and area of each labelled object whose equivalent diameter is in range."""
    from scipy import ndimage

    # Consecutive ids, so bincount and find_objects stay small.
    present = np.zeros(int(labels.max()) + 1, bool)
    present[labels.ravel()] = True
    present[0] = False
    relabel = np.zeros(present.size, np.int32)
    relabel[present] = np.arange(1, present.sum() + 1, dtype=np.int32)
    labels = relabel[labels]

    n_labels = int(labels.max())
    flat = labels.ravel()
    on = np.flatnonzero(flat)
    ys, xs = np.divmod(on, labels.shape[1])
    lab_on = flat[on]
    area = np.bincount(lab_on, minlength=n_labels + 1).astype(np.float64)
    sy = np.bincount(lab_on, weights=ys, minlength=n_labels + 1)
    sx = np.bincount(lab_on, weights=xs, minlength=n_labels + 1)
    area = area[1:]
    cy, cx = sy[1:] / area, sx[1:] / area
    diam_px = np.sqrt(4 * area / math.pi)
    sel = np.flatnonzero((diam_px >= min_d_px) & (diam_px <= max_d_px))
    bbox = np.array(
        [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)], dtype=np.int64
    ).reshape(-1, 4)
    return {
        "cx": cx[sel],
        "cy": cy[sel],
        "x0": bbox[sel, 0],
        "y0": bbox[sel, 1],
        "x1": bbox[sel, 2],
        "y1": bbox[sel, 3],
        "area_px": area[sel],
    }


def detect_cells(region: np.ndarray, mpp: float, cfg: SlideConfig, threshold: float | None = None) -> list[dict]:
    """Cells in one RGB region (mpp = microns per pixel of this region).

    Darkness threshold (Otsu, clipped relative to the glass; `threshold` overrides it),
    small holes filled, specks removed, touching cells split by a distance-transform
    watershed; objects with equivalent diameter in [min_cell_um, max_cell_um] are kept.
    Each dict: cx, cy, x0, y0, x1, y1 (region pixels), diameter_um, area_um2."""
    found = segment_region(region, mpp, cfg, threshold)
    area_um2 = found["area_px"] * mpp * mpp
    diameter_um = np.sqrt(4 * area_um2 / math.pi)
    return [
        {
            "cx": float(found["cx"][i]),
            "cy": float(found["cy"][i]),
            "x0": int(found["x0"][i]),
            "y0": int(found["y0"][i]),
            "x1": int(found["x1"][i]),
            "y1": int(found["y1"][i]),
            "diameter_um": float(diameter_um[i]),
            "area_um2": float(area_um2[i]),
        }
        for i in range(len(area_um2))
    ]
