"""Accuracy pairs from a pair store, encoded for predictors, split into train and validation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import RecipeError
from ..predictors.encoding import encode_pairs
from ..predictors.pair_store import Pair, PairStore
from ..recipe.markers import BitChoices, ExistingFile, Fraction, PositiveInt, SpaceSpec
from ..spaces.protocol import ElasticSpace, SearchSpace
from ..targets import TargetName


class PairsDataModule(pl.LightningDataModule):
    """Pairs of one kind (``fp32`` or ``quant``) of a store; a seeded validation split.

    A store holding pairs measured on several supernets (their weights' hashes differ) is refused
    unless ``checkpoint_hash`` names the one to train on: a predictor of a mixture fits none.
    Likewise quantized pairs of several deployment targets (fake-quantization grids) are refused
    unless ``target`` names the one to train on (``auto``: this host's) or ``allow_mixed_targets``.
    """

    def __init__(self, path: ExistingFile, space: SpaceSpec, kind: Literal["fp32", "quant"] = "fp32",
                 val_fraction: Fraction = 0.2, seed: int = 0, max_train_pairs: PositiveInt | None = None,
                 batch_size: PositiveInt = 256, policy_bits: BitChoices = [4, 6, 8],  # noqa: B006
                 checkpoint_hash: str | None = None, allow_mixed_targets: bool = False,
                 target: TargetName | None = None) -> None:
        super().__init__()
        self.select_target = target
        #: the one deployment target of the quantized pairs read (None: fp32 pairs, or unrecorded)
        self.target: str | None = None
        self.allow_mixed_targets = allow_mixed_targets
        from ..registry import SPACES

        self.path, self.kind, self.val_fraction, self.seed = path, kind, val_fraction, seed
        self.max_train_pairs, self.batch_size, self.checkpoint_hash = max_train_pairs, batch_size, checkpoint_hash
        self.space: SearchSpace = SPACES.build(space)
        self.policy_space = None
        if kind == "quant":
            from ..spaces.quant_policy import QuantPolicySpace

            if not isinstance(self.space, ElasticSpace):
                raise RecipeError("quantized pairs carry per-block bit widths, so their space must be elastic "
                                  "(once-for-all style)", key="data.space", given=dict(space),
                                  allowed="an elastic space, e.g. ofa_mbv3_cifar")
            self.policy_space = QuantPolicySpace(bit_choices=policy_bits)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def policy_features(self) -> int:
        if self.policy_space is None:
            return 0
        assert isinstance(self.space, ElasticSpace)  # checked in __init__ for quantized pairs
        return self.policy_space.encoding_size(self.space.num_blocks)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = PairStore(self.path, key="data.path").pairs(kind=self.kind)
        pairs = self._one_supernet(pairs)
        self._check_pairs(pairs)
        from ..targets import check_same_target, resolve_target

        if self.select_target is not None:
            wanted = resolve_target(self.select_target, key="data.target").name
            found = sorted({str(p.target) for p in pairs})
            pairs = [p for p in pairs if p.target == wanted]
            if not pairs:
                raise RecipeError(f"the store has no pairs of kind '{self.kind}' measured for this deployment target",
                                  key="data.target", given=wanted,
                                  allowed=f"a target of {self.path}: {', '.join(found) or 'none'}")
        # one predictor learns one fake-quantization grid: pairs of two targets are not pooled
        targets = sorted({p.target for p in pairs if p.target is not None})
        check_same_target({f"pairs of {t} in {self.path}": t for t in targets}, None, self.allow_mixed_targets,
                          key="data.path")
        self.target = targets[0] if len(targets) == 1 else None
        if len(pairs) < 4:
            raise RecipeError(f"the store has {len(pairs)} pairs of kind '{self.kind}'; a predictor needs more",
                              key="data.path", given=str(self.path))
        order = np.random.default_rng(self.seed).permutation(len(pairs))
        n_val = max(1, int(round(len(pairs) * self.val_fraction)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        if self.max_train_pairs is not None:
            train_idx = train_idx[: self.max_train_pairs]
        self.train_set = self._dataset([pairs[i] for i in train_idx])
        self.val_set = self._dataset([pairs[i] for i in val_idx])

    def _one_supernet(self, pairs: Sequence[Pair]) -> list[Pair]:
        counts = Counter(p.checkpoint_hash for p in pairs)
        found = ", ".join(f"{h} ({n} pairs)" for h, n in counts.most_common())
        if self.checkpoint_hash is not None:
            if self.checkpoint_hash not in counts:
                raise RecipeError(f"the store has no pairs of kind '{self.kind}' measured on this supernet",
                                  key="data.checkpoint_hash", given=self.checkpoint_hash,
                                  allowed=f"a hash of {self.path}: {found or 'none'}")
            return [p for p in pairs if p.checkpoint_hash == self.checkpoint_hash]
        if len(counts) > 1:
            raise RecipeError(f"the store holds pairs of {len(counts)} supernets: {found}", key="data.path",
                              given=str(self.path), allowed="pairs of one supernet, or data.checkpoint_hash=<hash> "
                              "to choose one")
        return list(pairs)

    def _check_pairs(self, pairs: Sequence[Pair]) -> None:
        """Every pair must be a subnet (and policy) of this space: a store of another supernet's
        pairs would otherwise train a predictor on encodings that mean something else."""
        for index, pair in enumerate(pairs):
            try:
                self.space.validate(pair.arch)
                if self.policy_space is not None:
                    if pair.policy is None:
                        raise ValueError("it has no policy")
                    self.policy_space.validate(pair.policy, self.space.num_blocks)
            except (ValueError, KeyError, TypeError) as error:  # the space's check of stored data
                raise RecipeError(f"pair {index} of kind '{self.kind}' does not fit data.space ({error}): the store "
                                  "holds pairs of another space or supernet", key="data.path", given=str(self.path),
                                  allowed=f"a store of pairs measured on a supernet of {type(self.space).__name__} "
                                  f"{self.space.hparams()}") from None

    def _dataset(self, pairs: Sequence[Pair]) -> TensorDataset:
        archs, policies, targets = encode_pairs(self.space, self.policy_space, pairs)
        if policies is None:
            policies = torch.zeros(len(pairs), 0)
        return TensorDataset(archs, policies, targets)

    @property
    def train_mean(self) -> float:
        assert self.train_set is not None
        return float(self.train_set.tensors[2].mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(1, len(self.val_set or [])), shuffle=False)
