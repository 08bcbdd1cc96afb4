"""torch Dataset over split rows, with an in-memory cache of decoded, resized base images.

JPEG decoding and resizing happen once per image (not once per epoch); augmentation runs
on the cached uint8 arrays. Augmentation randomness is keyed by (seed, epoch, index), so a
resumed run sees exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.data.images import ImageLimits, load_rgb
from pipeline.data.transforms import augmentation, base_resize, to_tensor


def load_base_images(paths: list[Path], size: int, limits: ImageLimits = ImageLimits(), desc: str = "cache"):
    """Decode and resize every image once; returns a list of uint8 size x size x 3 arrays."""
    from tqdm import tqdm

    return [
        base_resize(np.asarray(load_rgb(p, limits)), size)
        for p in tqdm(paths, desc=desc, unit="img", disable=None, file=sys.stderr, leave=False)
    ]


class CellDataset:
    """Items are (normalised 3xHxW float tensor, label index)."""

    def __init__(self, images: list[np.ndarray], targets: list[int], preset: str, mean, std, seed: int = 0):
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images = images
        self.targets = targets
        self.mean, self.std = mean, std
        self.seed = seed
        self.epoch = 0
        self.augment = augmentation(preset, seed=seed)
        self.identity = preset == "eval"

    @classmethod
    def from_frame(
        cls,
        frame,
        root: Path,
        labels: tuple[str, ...],
        size: int,
        preset: str,
        mean,
        std,
        seed: int = 0,
        desc: str = "cache",
    ) -> "CellDataset":
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the label map's labels {list(labels)}")
        images = load_base_images([root / p for p in frame["path"]], size, desc=desc)
        return cls(images, [index[x] for x in frame["label"]], preset, mean, std, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        if not self.identity:
            self.augment.set_random_seed((self.seed * 1_000_003 + self.epoch * 10_007 + i) % 2**32)
            image = self.augment(image=image)["image"]
        return to_tensor(image, self.mean, self.std), self.targets[i]
