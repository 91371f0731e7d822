"""ImageNet-style class folders: ``train_dir/<class>/*.jpg`` and ``val_dir/<class>/*.jpg``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from ..recipe.markers import ExistingDir
from .base import ImageClassificationDataModule


class ImageFolderDataModule(ImageClassificationDataModule):
    """Decodes with torchvision; augmentation (random resized crop, flip) on uint8 tensors."""

    def __init__(self, train_dir: ExistingDir, val_dir: ExistingDir, image_size: int = 224,
                 resize_ratio: float = 0.875, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self._image_size = image_size
        self.resize_ratio = resize_ratio
        self._classes: list[str] | None = None

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def num_classes(self) -> int:
        if self._classes is None:
            from torchvision.datasets.folder import find_classes

            self._classes = find_classes(self.train_dir)[0]
        return len(self._classes)

    def train_transform(self) -> Callable:
        from torchvision.transforms import v2

        steps = [v2.ToImage(), v2.RandomResizedCrop(self._image_size, antialias=True)]
        if self.augment:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose([*steps, v2.ToDtype(torch.uint8)])

    def train_batch_transform(self) -> None:
        return None  # the per-image transform above already crops and flips

    def eval_transform(self) -> Callable:
        from torchvision.transforms import v2

        resize = int(round(self._image_size / self.resize_ratio))
        return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(self._image_size),
                           v2.ToDtype(torch.uint8)])

    def load_train(self, transform: Callable | None) -> Dataset:
        from torchvision.datasets import ImageFolder

        return ImageFolder(self.train_dir, transform=transform)

    def load_test(self, transform: Callable | None) -> Dataset:
        from torchvision.datasets import ImageFolder

        return ImageFolder(self.val_dir, transform=transform)
