"""Image classification sets stored as ``.npz`` arrays (``x`` uint8 NHWC, ``y`` int)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..npz import NPZ_LAYOUT, check_image_arrays, load_npz
from ..recipe.markers import ExistingFile, Fraction, PositiveInt
from .base import ArrayImageDataset, ImageClassificationDataModule

__all__ = ["NPZ_LAYOUT", "NpzDataModule", "check_image_arrays", "load_npz"]


class NpzDataModule(ImageClassificationDataModule):
    """Any image set as arrays; ``test_path`` defaults to a seeded 10% of the training file."""

    def __init__(self, train_path: ExistingFile, test_path: ExistingFile | None = None,
                 num_classes: PositiveInt | None = None, test_fraction: Fraction = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_path = train_path
        self.test_path = test_path
        self.test_fraction = test_fraction
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._num_classes = num_classes

    def _split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if not self._arrays:
            x, y = load_npz(self.train_path, "data.train_path", self._num_classes)
            if self.test_path is not None:
                self._arrays = {"train": (x, y), "test": load_npz(self.test_path, "data.test_path",
                                                                  self._num_classes)}
            else:
                order = np.random.default_rng(self.seed + 1).permutation(len(y))
                cut = int(round(len(y) * self.test_fraction))
                self._arrays = {"train": (x[order[cut:]], y[order[cut:]]), "test": (x[order[:cut]], y[order[:cut]])}
        return self._arrays[which]

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(self._split("train")[1].max()) + 1
        return self._num_classes

    @property
    def image_size(self) -> int:
        return int(self._split("train")[0].shape[1])

    def load_train(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._split("train"), transform)

    def load_test(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._split("test"), transform)
