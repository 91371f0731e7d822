"""CIFAR-10 from ``train.npz``/``test.npz`` arrays or torchvision's ``cifar-10-batches-py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from ..recipe.markers import DownloadableDir
from .arrays import load_npz
from .base import ArrayImageDataset, ImageClassificationDataModule

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10. ``root`` holds either the arrays layout or torchvision's; with ``download`` and
    neither present, torchvision fetches the official archive into ``root``."""

    default_mean = CIFAR10_MEAN
    default_std = CIFAR10_STD

    def __init__(self, root: DownloadableDir = "data/cifar10", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.download = download
        self._arrays: dict[bool, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_size(self) -> int:
        return 32

    def prepare_data(self) -> None:
        if self._layout() == "missing":
            if not self.download:
                raise RecipeError(
                    "no CIFAR-10 found here", key="data.root", given=str(self.root),
                    allowed="a directory with train.npz and test.npz, or torchvision's cifar-10-batches-py "
                    "(set data.download=true to fetch it)")
            from torchvision.datasets import CIFAR10

            CIFAR10(str(self.root), train=True, download=True)
            CIFAR10(str(self.root), train=False, download=True)

    def _layout(self) -> str:
        if (self.root / "train.npz").is_file() and (self.root / "test.npz").is_file():
            return "arrays"
        if (self.root / "cifar-10-batches-py").is_dir():
            return "torchvision"
        return "missing"

    def _read(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        if train not in self._arrays:
            layout = self._layout()
            if layout == "missing":
                self.prepare_data()
                layout = self._layout()
            if layout == "arrays":
                self._arrays[train] = load_npz(self.root / ("train.npz" if train else "test.npz"), "data.root",
                                              self.num_classes)
            else:
                from torchvision.datasets import CIFAR10

                dataset = CIFAR10(str(self.root), train=train, download=False)
                self._arrays[train] = (dataset.data, np.asarray(dataset.targets, dtype=np.int64))
        return self._arrays[train]

    def load_train(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._read(True), transform)

    def load_test(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(*self._read(False), transform)
