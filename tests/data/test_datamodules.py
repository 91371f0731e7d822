"""Shapes, splits and determinism of the data modules (all offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_DIR

from lightning_nas.data.arrays import NpzDataModule
from lightning_nas.data.base import holdout_split, step_resolution
from lightning_nas.data.cifar10 import CIFAR10DataModule
from lightning_nas.data.digits import DigitsDataModule
from lightning_nas.data.folders import ImageFolderDataModule
from lightning_nas.errors import RecipeError


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_digits_needs_no_network_and_no_shared_folder() -> None:
    dm = DigitsDataModule(batch_size=16, num_workers=0, holdout_size=100)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() < dm.num_classes == 10
    assert len(dm.train_set) + len(dm.holdout_set) + len(dm.val_set) == 1797
    normalized = dm.normalize(images, 24)
    assert normalized.shape == (16, 3, 24, 24) and normalized.dtype == torch.float32


def test_holdout_is_disjoint_from_training_and_seeded() -> None:
    train, holdout = holdout_split(1000, 100, seed=3)
    assert len(holdout) == 100 and len(train) == 900 and not set(train) & set(holdout)
    assert np.array_equal(holdout, holdout_split(1000, 100, seed=3)[1])
    assert not np.array_equal(holdout, holdout_split(1000, 100, seed=4)[1])
    dm = DigitsDataModule(num_workers=0, holdout_size=50, seed=3)
    dm.setup()
    assert not set(dm.train_set.indices) & set(dm.holdout_set.indices)
    # the held-out images are the training images at those indices, without augmentation
    base = dm.holdout_set.dataset
    assert torch.equal(dm.holdout_set[0][0], base.images[dm.holdout_set.indices[0]])


def test_training_order_is_deterministic_with_a_seed() -> None:
    def first_batch(seed: int) -> torch.Tensor:
        dm = DigitsDataModule(num_workers=0, seed=seed, augment=False, batch_size=8)
        dm.setup()
        return next(iter(dm.train_dataloader()))[1]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_an_epoch_is_the_same_however_many_epochs_came_before() -> None:
    """Order and augmentation of epoch e depend on (seed, e) only: a resumed run sees the same batches."""

    def epoch_batch(epoch: int, num_workers: int, warm_epochs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        dm = DigitsDataModule(num_workers=num_workers, seed=5, augment=True, batch_size=16)
        dm.setup()
        loader = dm.train_dataloader()
        for warm in range(warm_epochs):  # a process that already ran earlier epochs
            loader.sampler.set_epoch(warm)
            next(iter(loader))
            torch.rand(3)  # other consumers of the global generator make no difference
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    fresh = epoch_batch(2, num_workers=0)
    for other in (epoch_batch(2, num_workers=0, warm_epochs=2), epoch_batch(2, num_workers=2)):
        assert torch.equal(fresh[0], other[0]) and torch.equal(fresh[1], other[1])
    next_epoch = epoch_batch(3, num_workers=0)
    assert not torch.equal(fresh[1], next_epoch[1])
    # augmentation is really on: the same image in two epochs is shifted differently
    dm = DigitsDataModule(num_workers=0, seed=5, augment=True)
    dm.setup()
    views = [dm.train_set.__getitems__([(0, epoch)])[0][0] for epoch in range(6)]
    assert any(not torch.equal(views[0], view) for view in views[1:])
    assert torch.equal(views[1], dm.train_set.__getitems__([(0, 1)])[0][0])


def test_step_resolution_is_a_function_of_the_step() -> None:
    choices = [24, 28, 32]
    drawn = [step_resolution(choices, 0, s) for s in range(60)]
    assert drawn == [step_resolution(choices, 0, s) for s in range(60)]
    assert set(drawn) == set(choices)


def test_npz_module_reads_arrays_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(120, 16, 16, 3), dtype=np.uint8)
    y = np.arange(120) % 4
    np.savez(tmp_path / "set.npz", x=x, y=y)
    dm = NpzDataModule(train_path=str(tmp_path / "set.npz"), holdout_size=10, num_workers=0, batch_size=4)
    dm.setup()
    assert dm.num_classes == 4 and dm.image_size == 16
    assert len(dm.val_set) == 12 and len(dm.train_set) == 98 and len(dm.holdout_set) == 10


def test_npz_with_wrong_arrays_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    dm = NpzDataModule(train_path=str(tmp_path / "bad.npz"), num_workers=0)
    with pytest.raises(RecipeError, match="no array 'x'"):
        dm.setup()


def test_image_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), image_size=32,
                               holdout_size=2, num_workers=0, batch_size=4)
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    assert dm.num_classes == 2 and images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert len(dm.train_set) == 10 and len(dm.holdout_set) == 2


def test_cifar10_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no CIFAR-10 found"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


@pytest.mark.skipif(not (CIFAR10_DIR / "train.npz").is_file(), reason="needs ../shared/data/cifar10")
def test_cifar10_arrays_layout() -> None:
    dm = CIFAR10DataModule(root=str(CIFAR10_DIR), num_workers=0, holdout_size=2000, val_subset=1000)
    dm.setup()
    assert len(dm.train_set) == 48000 and len(dm.holdout_set) == 2000 and len(dm.val_set) == 1000
    image, label = dm.val_set[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
