"""albumentations presets, chosen by name in params (`train.augment`).

Every preset works on the *base image*: the cell resized so its long side is `size` and
padded square (`base_resize`). That is what the decode cache stores, and what evaluation and
inference see, so train and test share one geometry. Normalisation is the model's own
(`mean`/`std` in the model's metadata), applied last by `to_tensor`.
"""
from __future__ import annotations

import functools

import numpy as np

PRESETS = ("train", "train_light", "eval")


def base_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving resize (long side = size, bicubic) + pad to size x size.

    Padding repeats the edge: cell crops such as Herlev's sit on a flat background colour.
    """
    return _resize_pipeline(size)(image=image)["image"]


@functools.lru_cache(maxsize=8)
def _resize_pipeline(size: int):
    # Built once per size: base_resize runs for every cell of a slide.
    import albumentations as A
    import cv2

    return A.Compose([
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_REPLICATE, position="center"),
    ])


def augmentation(name: str, seed: int | None = None):
    """The named preset as an albumentations Compose (uint8 HxWx3 in, same size out)."""
    import albumentations as A
    import cv2

    if name == "eval":
        return A.Compose([], seed=seed)
    if name == "train_light":
        return A.Compose([A.D4()], seed=seed)
    if name == "train":
        return A.Compose([
            # Cells have no orientation: all 8 dihedral transforms are valid.
            A.D4(),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_REPLICATE, p=0.5),
            # Stain and illumination vary between labs and batches.
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=10, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.3),
            A.ImageCompression(quality_range=(60, 100), p=0.3),
        ], seed=seed)
    raise ValueError(f"unknown augmentation preset '{name}' (choose from {', '.join(PRESETS)})")


def to_tensor(image: np.ndarray, mean, std):
    """uint8 HxWx3 -> normalised float32 3xHxW torch tensor."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t
