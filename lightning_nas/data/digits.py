"""An embedded default data set: scikit-learn's 8x8 handwritten digits, upscaled to RGB.

It ships inside scikit-learn, so recipes run on a fresh offline machine with no data at all.
1,797 images in 10 classes; a seeded 20% is the test set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe.markers import Fraction, PositiveInt
from .augment import BatchCropFlip
from .base import ArrayImageDataset, ImageClassificationDataModule


def digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 (N, image_size, image_size, 3) images and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    return images.numpy(), digits.target.astype(np.int64)


class DigitsDataModule(ImageClassificationDataModule):
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)

    def __init__(self, image_size: PositiveInt = 32, test_fraction: Fraction = 0.2, **kwargs) -> None:
        kwargs.setdefault("holdout_size", 200)
        super().__init__(**kwargs)
        self._image_size = image_size
        self.test_fraction = test_fraction
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_size(self) -> int:
        return self._image_size

    def _split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if not self._splits:
            images, labels = digits_arrays(self._image_size)
            order = np.random.default_rng(12345).permutation(len(labels))  # fixed: the test set never moves
            cut = int(round(len(labels) * self.test_fraction))
            self._splits = {"test": (images[order[:cut]], labels[order[:cut]]),
                            "train": (images[order[cut:]], labels[order[cut:]])}
        return self._splits[which]

    def train_batch_transform(self) -> BatchCropFlip | None:
        # Digits are not mirror-symmetric: shift-and-crop only.
        return BatchCropFlip(self._image_size // 8, "constant", flip=False) if self.augment else None

    def load_train(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._split("train"), transform)

    def load_test(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._split("test"), transform)
