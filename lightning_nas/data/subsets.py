"""Evaluation subsets: a seeded sample over the whole set, stratified by label, never "the first N".

Sets stored by class (every class-folder data set, many ``.npz`` exports) put all images of class 0
first: the first 200 test images are then one class, and a top-1 on them says nothing.
:func:`evaluation_subset` is the one way this package takes fewer images than a split holds (QAT
test and int8-agreement images, ``train_subset``/``val_subset``, smoke runs' batch limits,
benchmark ``--test-images``).

It returns a seeded order in which every prefix is stratified: each class's images are shuffled,
the ``j``-th of a class of ``n_c`` images is placed at ``(j + u) / n_c`` (``u`` uniform, seeded) and
all images are sorted by that position. The first ``N`` of the order then hold each class in its
share of the set, to within one image, so a split kept in this order also gives a fair sample to
anything that reads only its first batches (Lightning's ``limit_val_batches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def evaluation_subset(labels: Sequence[int] | np.ndarray | None, size: int | None, seed: int,
                      length: int | None = None) -> np.ndarray:
    """Indices of ``size`` items (``None``: all) of a set, in stratified seeded order.

    ``labels`` are the items' class labels; without labels (``None``, then ``length`` gives the
    set's size) the sample is a seeded uniform one. The result depends only on the labels, ``size``
    and ``seed``, and a smaller ``size`` gives a prefix of a larger one.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        if length is None:
            raise TypeError("evaluation_subset needs labels or the set's length")
        order = rng.permutation(length)
    else:
        labels = np.asarray(labels)
        positions = np.empty(len(labels), dtype=np.float64)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rank = rng.permutation(len(members))
            positions[members] = (rank + rng.random(len(members))) / len(members)
        order = np.argsort(positions, kind="stable")
    return order if size is None else order[: max(0, int(size))]


def dataset_labels(dataset: Any) -> np.ndarray | None:
    """The class labels of a data set without reading its images, when it keeps them (arrays,
    torchvision folders, subsets of those); None otherwise."""
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch's Subset and the like
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    for attribute in ("labels", "targets"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels)
    return None
