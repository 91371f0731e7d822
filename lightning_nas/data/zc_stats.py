"""Node-wise zero-cost statistics + benchmark accuracies, split for ranker training.

Reads a statistics cache written by :func:`lightning_nas.predictors.zc_cache.compute_statistics`
and the accuracies of ``nb201_dev.csv``; architectures present in both are shuffled with
``seed``: the first ``num_train`` train, the next ``num_val`` (default: all the rest) validate.
With ``compute_missing`` the architectures are drawn from the accuracy CSV instead (``num_train
+ num_val`` of them, seeded) and their missing statistics are computed into the cache first
(resumable: a killed run keeps every finished architecture).
Targets are standardised with the training mean / std (rank metrics do not care; DiffKendall's
sharpness ``alpha`` and MSE do). By default a batch is a whole split, because ranking losses
compare architectures within a batch.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nas.spaces.nb201 import format_arch, parse_arch

from ..errors import RecipeError


def read_accuracies(csv_path: str | Path, target_column: str) -> dict[str, float]:
    with Path(csv_path).open() as f:
        rows = list(csv.DictReader(f))
    if rows and target_column not in rows[0]:
        raise RecipeError(f"column {target_column!r} not in {csv_path}; columns: {', '.join(rows[0])}", key="data.target_column")
    return {format_arch(parse_arch(r["ArchitectureString"])): float(r[target_column]) for r in rows}


class ZCStatsDataModule(pl.LightningDataModule):
    def __init__(
        self,
        stats_path: str = "runs/benchmarks/nb201_zc_stats.jsonl",
        accuracy_csv: str | None = None,
        target_column: str = "CIFAR10TestAccuracy200Epochs",
        proxies: list[str] | None = None,
        num_train: int = 78,
        num_val: int | None = None,
        seed: int = 0,
        batch_size: int = 0,
        compute_missing: bool = False,
        images_path: str | None = None,
        stats_seed: int = 0,
    ) -> None:
        super().__init__()
        # The task records the proxies and statistics seed actually used (from the cache header).
        self.save_hyperparameters(ignore=["proxies", "stats_seed"])
        self.stats_path, self.accuracy_csv, self.target_column = stats_path, accuracy_csv, target_column
        self.proxies, self.num_train, self.num_val, self.seed = proxies, num_train, num_val, seed
        self.batch_size = batch_size
        self.compute_missing, self.images_path = compute_missing, images_path
        self.stats_seed: int | None = stats_seed if compute_missing else None
        self.train_archs: list[str] = []
        self.val_archs: list[str] = []
        self._arrays: tuple[np.ndarray, np.ndarray, Sequence[int], Sequence[int]] | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @classmethod
    def from_arrays(cls, features: np.ndarray, targets: np.ndarray, train_index: Sequence[int],
                    val_index: Sequence[int], batch_size: int = 0) -> ZCStatsDataModule:
        """In-memory variant: ``features [A, L, K]`` and ``targets [A]`` with explicit split rows."""
        dm = cls(num_train=len(train_index), batch_size=batch_size)
        dm._arrays = (np.asarray(features), np.asarray(targets), list(train_index), list(val_index))
        return dm

    @property
    def num_nodes(self) -> int:
        self._require_setup()
        return int(self.train_set.tensors[0].shape[1])

    @property
    def num_stats(self) -> int:
        self._require_setup()
        return int(self.train_set.tensors[0].shape[2])

    def train_features(self) -> torch.Tensor:
        """Raw training features ``[n, L, K]``: what the ranker's min-max scaler is fit on."""
        self._require_setup()
        return self.train_set.tensors[0]

    def _require_setup(self) -> None:
        if self.train_set is None:
            self.setup("fit")

    def _compute_missing(self, accuracies: dict[str, float]) -> set[str]:
        """Statistics for ``num_train + num_val`` seeded architectures of the CSV; returns them."""
        from lightning_nas.predictors.zc_cache import PARZC_PROXIES, compute_statistics, load_cifar10_batch

        labelled = sorted(accuracies)
        wanted = len(labelled) if self.num_val is None else min(self.num_train + self.num_val, len(labelled))
        chosen = [labelled[i] for i in np.random.default_rng(self.seed).permutation(len(labelled))[:wanted]]
        if self.images_path is None:
            raise RecipeError("computing missing statistics needs the images they are computed on",
                              key="data.images_path", allowed="a CIFAR-10 .npz (x uint8 NHWC, y int)")
        self.proxies = list(self.proxies or PARZC_PROXIES)
        images, labels = load_cifar10_batch(self.images_path, seed=self.stats_seed, key="data.images_path")
        compute_statistics(chosen, self.proxies, images, labels, seed=self.stats_seed, cache_path=self.stats_path)
        return set(chosen)

    def _load_file(self) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        from lightning_nas.predictors.zc_cache import load_statistics

        if self.accuracy_csv is None:  # None only for the in-memory variant, which never reads files
            raise RecipeError("the architectures' accuracies are needed", key="data.accuracy_csv",
                              allowed="a NAS-Bench-201 CSV with ArchitectureString and accuracy columns")
        accuracies = read_accuracies(self.accuracy_csv, self.target_column)
        chosen = self._compute_missing(accuracies) if self.compute_missing else None
        if not Path(self.stats_path).is_file():
            raise FileNotFoundError(f"data.stats_path: {self.stats_path} does not exist; set data.compute_missing=true "
                                    "to compute it, or fill it with benchmarks/nb201_zero_cost.py --stats-only")
        # proxies=None: those every cached architecture has; otherwise the architectures that
        # have all the requested ones.
        stats = load_statistics(self.stats_path, proxies=self.proxies)
        if not stats.archs:
            raise RecipeError(f"no architecture in {self.stats_path} has all of {self.proxies}", key="data.proxies")
        self.proxies = list(stats.proxies)
        # Sorting first makes the split depend only on the seed and the set, not on cache order.
        archs = sorted(a for a in stats.archs if a in accuracies and (chosen is None or a in chosen))
        if self.num_train >= len(archs):
            raise RecipeError(f"num_train={self.num_train} leaves no validation data ({len(archs)} labelled archs)", key="data.num_train")
        perm = np.random.default_rng(self.seed).permutation(len(archs))
        train = perm[: self.num_train]
        val = perm[self.num_train:] if self.num_val is None else perm[self.num_train: self.num_train + self.num_val]
        self.train_archs = [archs[i] for i in train]
        self.val_archs = [archs[i] for i in val]
        self.stats_seed = stats.seed
        rows = stats.select(archs)
        targets = np.array([accuracies[a] for a in archs])
        return rows.nodes, targets, train.tolist(), val.tolist()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        features, targets, train, val = self._arrays if self._arrays is not None else self._load_file()
        y_train = targets[list(train)]
        mean, std = float(y_train.mean()), float(y_train.std()) or 1.0
        # float64: raw statistics exceed float32's range (synflow ~1e50); ParZC log-scales them.
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor((targets - mean) / std, dtype=torch.float32)
        train_t = torch.as_tensor(list(train), dtype=torch.long)
        val_t = torch.as_tensor(list(val), dtype=torch.long)
        self.train_set = TensorDataset(x[train_t], y[train_t])
        self.val_set = TensorDataset(x[val_t], y[val_t])

    def _loader(self, ds: TensorDataset, shuffle: bool) -> DataLoader:
        size = len(ds) if self.batch_size <= 0 else min(self.batch_size, len(ds))
        return DataLoader(ds, batch_size=max(size, 1), shuffle=shuffle and size < len(ds))

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_set, shuffle=False)
