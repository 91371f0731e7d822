"""The image-classification data module every data source builds on.

Sources hand over uint8 images (arrays in NHWC, or files decoded to uint8 tensors); augmentation
runs on uint8 tensors per sample, and conversion to float, normalisation and the per-step
resolution happen once per batch after it reaches the device (cheaper than per sample on a CPU).

Three disjoint splits: ``train`` (minus the held-out slice), ``holdout`` (a seeded slice of the
training set for batch-norm recalibration and accuracy pairs) and ``val`` (the source's test
set). Multi-resolution training draws one resolution per optimizer step from ``resolutions``,
seeded by the global step so every DDP rank uses the same one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..errors import RecipeError
from ..recipe.markers import NonNegativeInt, PositiveInt
from .augment import BatchCropFlip
from .subsets import dataset_labels, evaluation_subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ArrayImageDataset(Dataset):
    """uint8 NHWC images and integer labels, returning (uint8 CHW tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 with shape (N, H, W, C), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """A permutation per epoch drawn from ``(seed, epoch)``, yielding ``(position, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch (through its distributed wrapper too), so
    the order of epoch ``e`` does not depend on how many epochs this process has run: a run
    resumed from a checkpoint sees the same batches as one that never stopped. The epoch travels
    with each position so that per-sample augmentation can be seeded the same way.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        epoch = self.epoch
        return ((int(position), epoch) for position in torch.randperm(self.length, generator=generator))


class SeededTrainingSubset(Dataset):
    """Training images ``dataset[indices]`` with augmentation seeded by ``(seed, epoch, index)``.

    Augmentations draw from torch's global generator; seeding it per sample (inside a forked RNG
    state, so the caller's generator is untouched) makes the augmented batch a function of the
    epoch and the sample alone: identical after a resume and independent of worker processes.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None, seed: int,
                 batch_transform: BatchCropFlip | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.batch_transform = batch_transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        index = self.indices[position]
        image, label = self.dataset[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
                image = self.transform(image)
        return image, label

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch, collated, with the batch augmentation drawn from ``(seed, epoch, first key)``.

        A batch is a function of its keys: a resumed run, any worker count and every rank of a
        multi-node run see the same augmented images for the same batch.
        """
        samples = [self[key] for key in keys]
        images = torch.stack([image for image, _ in samples])
        labels = torch.as_tensor([int(label) for _, label in samples], dtype=torch.long)
        if self.batch_transform is not None and samples:
            position, epoch = keys[0] if isinstance(keys[0], tuple) else (keys[0], 0)
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + position)
            images = self.batch_transform(images, generator)
        return images, labels


def collated_batch(batch: Any) -> Any:
    """The collate function of loaders over a dataset whose ``__getitems__`` already collates."""
    return batch


def holdout_split(num_train: int, holdout_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): a seeded permutation, held-out slice first."""
    if not 0 <= holdout_size < num_train:
        raise RecipeError(f"the held-out slice must leave training images: the training set has {num_train}",
                          key="data.holdout_size", given=holdout_size, allowed=f"0 to {num_train - 1}")
    order = np.random.default_rng(seed).permutation(num_train)
    return np.sort(order[holdout_size:]), np.sort(order[:holdout_size])


def step_resolution(resolutions: Sequence[int], seed: int, step: int) -> int:
    """The training resolution of optimizer step ``step``: the same on every rank."""
    return resolutions[random.Random(seed * 1_000_003 + step).randrange(len(resolutions))]


class ImageClassificationDataModule(pl.LightningDataModule):
    """Shared loading, splitting and batching; subclasses provide the images."""

    #: Per-source defaults, used when the recipe gives no mean/std.
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        *,
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 2,
        holdout_size: NonNegativeInt = 2000,
        seed: int = 0,
        resolutions: list[PositiveInt] | None = None,
        eval_resolution: PositiveInt | None = None,
        augment: bool = True,
        train_subset: PositiveInt | None = None,
        val_subset: PositiveInt | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.holdout_size = holdout_size
        self.seed = seed
        self.resolutions = list(resolutions) if resolutions else []
        self.eval_resolution = eval_resolution
        self.augment = augment
        self.train_subset = train_subset
        self.val_subset = val_subset
        self._mean = torch.tensor(mean or self.default_mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std or self.default_std).view(1, -1, 1, 1)
        self.train_set: Dataset | None = None
        self.holdout_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # --- what a source provides -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def load_train(self, transform: Callable | None) -> Dataset:
        """The full training set (before the held-out slice is taken out)."""
        raise NotImplementedError

    def load_test(self, transform: Callable | None) -> Dataset:
        raise NotImplementedError

    def train_transform(self) -> Callable | None:
        """Per-image work on one training image (decoding, resizing); none for in-memory arrays."""
        return None

    def train_batch_transform(self) -> BatchCropFlip | None:
        """Augmentation on each uint8 training batch; CIFAR-style crop and flip by default."""
        return BatchCropFlip(self.image_size // 8, "reflect", flip=True) if self.augment else None

    def eval_transform(self) -> Callable | None:
        return None

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full_train = self.load_train(None)
        self.check_resolutions()
        train_idx, holdout_idx = holdout_split(len(full_train), self.holdout_size, self.seed)
        if self.train_subset is not None:
            labels = dataset_labels(full_train)
            chosen = evaluation_subset(None if labels is None else labels[train_idx], self.train_subset, self.seed,
                                       len(train_idx))
            train_idx = np.sort(train_idx[chosen])
        self.train_set = SeededTrainingSubset(full_train, train_idx.tolist(), self.train_transform(), self.seed,
                                              self.train_batch_transform())
        self.holdout_set = Subset(self.load_train(self.eval_transform()), holdout_idx.tolist())
        val = self.load_test(self.eval_transform())
        # Kept in stratified order: val_subset, and anything reading only the first batches (smoke
        # runs' limit_val_batches, QAT's test_images), sees every class in its share.
        order = evaluation_subset(dataset_labels(val), self.val_subset, self.seed, len(val))
        self.val_set = Subset(val, order.tolist())

    def check_resolutions(self) -> None:
        """Training and evaluation resolutions against the stored images' size."""
        size = self.image_size
        for key, values in (("data.resolutions", self.resolutions),
                            ("data.eval_resolution", [self.eval_resolution] if self.eval_resolution else [])):
            too_large = [r for r in values if r > size]
            if too_large:
                raise RecipeError(f"the images are {size} x {size} pixels: resolutions above that would only "
                                  "upsample them", key=key, given=values, allowed=f"resolutions up to {size}")

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        collate = collated_batch if isinstance(dataset, SeededTrainingSubset) else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def holdout_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """The held-out training slice with evaluation transforms, in a fixed order."""
        loader = self._loader(self.holdout_set, False, batch_size or self.eval_batch_size)
        loader.num_workers = 0  # read once per subnet: worker start-up would cost more than it saves
        return loader

    def normalize(self, images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """uint8 NCHW -> normalised float, resized to ``resolution`` when given."""
        images = images.float().div_(255)
        images = (images - self._mean.to(images.device)) / self._std.to(images.device)
        if resolution is not None and resolution != images.shape[-1]:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if images.dtype != torch.uint8:
            return batch
        trainer = self.trainer
        if trainer is not None and trainer.training and self.resolutions:
            resolution = step_resolution(self.resolutions, self.seed, trainer.global_step)
        else:
            resolution = self.eval_resolution
        return self.normalize(images, resolution), labels
