"""Encode stored pairs for accuracy predictors: the one encoding path (training and search)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spaces.protocol import ElasticSpace, SearchSpace
from ..spaces.quant_policy import QuantPolicySpace
from .pair_store import Pair


def encode_pairs(space: SearchSpace | ElasticSpace, policy_space: QuantPolicySpace | None,
                 pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(architecture encodings, policy encodings or None, top-1) as float tensors.

    Any :class:`~lightning_nas.spaces.protocol.SearchSpace` encodes full-precision pairs; policy
    encodings zero the skipped blocks, so quantized pairs need an elastic space.
    """
    archs = torch.tensor([space.encode(p.arch) for p in pairs], dtype=torch.float32)
    targets = torch.tensor([p.top1 for p in pairs], dtype=torch.float32)
    if policy_space is None:
        return archs, None, targets
    if not isinstance(space, ElasticSpace):
        raise TypeError(f"quantized pairs need an elastic space (blocks that run or not), got {type(space).__name__}")
    policies = []
    for pair in pairs:
        active = set(space.active_blocks(pair.arch))
        policies.append(policy_space.encode(pair.policy, [b in active for b in range(space.num_blocks)]))
    return archs, torch.tensor(policies, dtype=torch.float32), targets
