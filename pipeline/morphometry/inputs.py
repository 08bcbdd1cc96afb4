"""What the segmentation reads: square crops of one size plus a mask of the pixels that are the image's own.

Plain images (a lab's cell crops, Herlev's) are scaled so their long side is the segmentation size and
padded with white that is marked invalid, and flat-colour padding already inside the file (Herlev's crops
were padded to a square with a flat colour) is found and marked invalid too, so it never counts as cell.
Slide crops come from the slide with their physical scale and the detected cell's box.
"""

from __future__ import annotations

import numpy as np

# A padding band is a run of edge rows (or columns) whose every pixel lies within this many grey levels of
# the band's colour: Herlev's JPEG padding varies by <= 6 levels, a cell's edge rows by far more.
FLAT_TOLERANCE = 12


def _flat_run(lines: np.ndarray, colour: np.ndarray) -> int:
    """How many leading rows of `lines` (k, w, 3) are flat and of `colour`."""
    flat = np.abs(lines.astype(np.int16) - colour).max(axis=(1, 2)) <= FLAT_TOLERANCE
    return int(np.argmin(flat)) if not flat.all() else len(flat)


def padding_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the widths of flat-colour bands along each edge of an RGB image."""
    h, w = image.shape[:2]
    corner = image[0, 0].astype(np.int16)
    top = _flat_run(image, image[0, w // 2].astype(np.int16))
    bottom = _flat_run(image[::-1], image[-1, w // 2].astype(np.int16))
    left = _flat_run(image.transpose(1, 0, 2), image[h // 2, 0].astype(np.int16))
    right = _flat_run(image.transpose(1, 0, 2)[::-1], image[h // 2, -1].astype(np.int16))
    del corner
    if top + bottom >= h or left + right >= w:  # a flat image: nothing is padding, it is all one colour
        return 0, 0, 0, 0
    return top, bottom, left, right


def plain_image_input(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(crop (size, size, 3), valid (size, size), pixels of the file per crop pixel) for one RGB image."""
    import cv2

    top, bottom, left, right = padding_box(image)
    h, w = image.shape[:2]
    valid_full = np.zeros((h, w), np.uint8)
    valid_full[top : h - bottom, left : w - right] = 1
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = np.full((size, size, 3), 255, np.uint8)
    valid = np.zeros((size, size), bool)
    y, x = (size - nh) // 2, (size - nw) // 2
    crop[y : y + nh, x : x + nw] = cv2.resize(
        np.ascontiguousarray(image[..., :3]), (nw, nh), interpolation=interpolation
    )
    valid[y : y + nh, x : x + nw] = cv2.resize(valid_full, (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    return crop, valid, max(h, w) / size


def plain_images_input(images: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`plain_image_input` for a list of images, stacked: (crops, valid, file px per crop px)."""
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool), np.zeros(0)
    parts = [plain_image_input(image, size) for image in images]
    return (
        np.stack([p[0] for p in parts]),
        np.stack([p[1] for p in parts]),
        np.array([p[2] for p in parts], float),
    )


def slide_crop_hints(boxes, cell_boxes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For slide crops of `size` px cut at level-0 `boxes` (x, y, w, h; square unless clipped at the slide
    edge) around cells with level-0 `cell_boxes` (x0, y0, x1, y1): (cell_hint masks (n, size, size), level-0
    px per crop px). The hint is the ellipse in the detected cell's box, grown by 15% and 2 crop pixels:
    cells are round, so it keeps a touching neighbour out without cutting the cell square."""
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    cell_boxes = np.asarray(cell_boxes, float).reshape(-1, 4)
    f = size / np.maximum(boxes[:, 2], boxes[:, 3])  # base_resize: long side -> size, centred padding
    oy = (size - np.round(boxes[:, 3] * f)) // 2
    ox = (size - np.round(boxes[:, 2] * f)) // 2
    cy = ((cell_boxes[:, 1] + cell_boxes[:, 3]) / 2 - boxes[:, 1]) * f + oy
    cx = ((cell_boxes[:, 0] + cell_boxes[:, 2]) / 2 - boxes[:, 0]) * f + ox
    ry = (cell_boxes[:, 3] - cell_boxes[:, 1]) / 2 * f * 1.15 + 2
    rx = (cell_boxes[:, 2] - cell_boxes[:, 0]) / 2 * f * 1.15 + 2
    grid = np.arange(size, dtype=np.float32) + 0.5
    dy = ((grid[None, :] - cy[:, None]) / ry[:, None]) ** 2
    dx = ((grid[None, :] - cx[:, None]) / rx[:, None]) ** 2
    hint = (dy[:, :, None] + dx[:, None, :]) <= 1.0
    return hint, 1 / f
