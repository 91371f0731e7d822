"""Image classification sets stored as ``.npz`` arrays (``x`` uint8 NHWC, ``y`` int)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..recipe.errors import RecipeError
from ..recipe.markers import ExistingFile
from .base import ArrayImageDataset, ImageClassificationDataModule


def load_npz(path: str | Path, what: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Read ``x``/``y`` from an ``.npz`` file, with errors that name the file and the problem."""
    try:
        with np.load(path) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays.files]
            if missing:
                raise RecipeError(f"the .npz file has no array {missing[0]!r}", key=what, given=str(path),
                                  allowed="an .npz with x (uint8, N x H x W x C) and y (int, N)")
            images, labels = arrays["x"], arrays["y"]
    except FileNotFoundError:
        raise RecipeError("file not found", key=what, given=str(path)) from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise RecipeError(f"x must be uint8 N x H x W x C, found {images.dtype} {images.shape}", key=what,
                          given=str(path))
    return images, labels.astype(np.int64)


class NpzDataModule(ImageClassificationDataModule):
    """Any image set as arrays; ``test_path`` defaults to a seeded 10% of the training file."""

    def __init__(self, train_path: ExistingFile, test_path: ExistingFile | None = None,
                 num_classes: int | None = None, test_fraction: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_path = train_path
        self.test_path = test_path
        self.test_fraction = test_fraction
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._num_classes = num_classes

    def _split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if not self._arrays:
            x, y = load_npz(self.train_path, "data.train_path")
            if self.test_path is not None:
                self._arrays = {"train": (x, y), "test": load_npz(self.test_path, "data.test_path")}
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
