"""Evaluation subsets: seeded, stratified by label, every prefix fair; and the data modules use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_nas.data.arrays import NpzDataModule
from lightning_nas.data.subsets import dataset_labels, evaluation_subset


def class_sorted_labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


@pytest.mark.parametrize("counts", [[100] * 10, [500, 300, 200], [7, 1, 992]])
def test_every_prefix_holds_each_class_in_its_share(counts: list[int]) -> None:
    labels = class_sorted_labels(counts)
    order = evaluation_subset(labels, None, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation of the whole set
    shares = np.array(counts) / len(labels)
    for size in range(1, len(labels) + 1, 23):
        found = np.bincount(labels[order[:size]], minlength=len(counts))
        assert np.all(np.abs(found - size * shares) <= 1.0 + 1e-9), (size, found, size * shares)


def test_first_200_of_a_class_sorted_set_are_balanced() -> None:
    labels = class_sorted_labels([1000] * 10)
    chosen = evaluation_subset(labels, 200, seed=3)
    assert len(chosen) == 200 and len(set(chosen.tolist())) == 200
    assert np.bincount(labels[chosen]).tolist() == [20] * 10
    # drawn over the whole set, not the front of each class
    assert chosen.max() > 9000 and np.ptp(chosen[labels[chosen] == 0]) > 500


def test_deterministic_seeded_and_nested() -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=777)
    first, again = evaluation_subset(labels, 100, seed=1), evaluation_subset(labels, 100, seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, evaluation_subset(labels, 100, seed=2))
    np.testing.assert_array_equal(evaluation_subset(labels, 40, seed=1), first[:40])
    assert len(evaluation_subset(labels, 10_000, seed=1)) == 777


def test_without_labels_a_seeded_uniform_sample() -> None:
    chosen = evaluation_subset(None, 50, seed=0, length=1000)
    assert len(set(chosen.tolist())) == 50 and chosen.max() < 1000
    np.testing.assert_array_equal(chosen, evaluation_subset(None, 50, seed=0, length=1000))
    with pytest.raises(TypeError):
        evaluation_subset(None, 5, seed=0)


def write_sorted_npz(path: Path, per_class: int, classes: int = 4, size: int = 8) -> Path:
    labels = class_sorted_labels([per_class] * classes)
    images = np.random.default_rng(0).integers(0, 255, size=(len(labels), size, size, 3), dtype=np.uint8)
    np.savez(path, x=images, y=labels)
    return path


def test_data_module_test_split_is_fair_from_its_first_batch(tmp_path: Path) -> None:
    train = write_sorted_npz(tmp_path / "train.npz", 50)
    test = write_sorted_npz(tmp_path / "test.npz", 25)
    dm = NpzDataModule(train_path=str(train), test_path=str(test), batch_size=8, eval_batch_size=20, num_workers=0,
                       holdout_size=20, augment=False, train_subset=40, val_subset=40)
    dm.setup("fit")
    assert np.bincount(dataset_labels(dm.val_set), minlength=4).tolist() == [10] * 4
    # what QAT's test_images and a smoke run's limit_val_batches=1 read: the first batch
    _, first_batch = next(iter(dm.test_dataloader()))
    assert torch.bincount(first_batch, minlength=4).tolist() == [5] * 4
    train_labels = dataset_labels(dm.train_set)
    assert np.bincount(train_labels, minlength=4).min() >= 9  # 40 of 180 training images, every class
