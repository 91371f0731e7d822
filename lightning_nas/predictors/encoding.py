"""Encode stored pairs for accuracy predictors: the one encoding path (training and search)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .pair_store import Pair


def encode_pairs(space: Any, policy_space: Any | None, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(architecture encodings, policy encodings or None, top-1) as float tensors."""
    archs = torch.tensor([space.encode(p.arch) for p in pairs], dtype=torch.float32)
    targets = torch.tensor([p.top1 for p in pairs], dtype=torch.float32)
    if policy_space is None:
        return archs, None, targets
    policies = []
    for pair in pairs:
        active = set(space.active_blocks(pair.arch))
        policies.append(policy_space.encode(pair.policy, [b in active for b in range(space.num_blocks)]))
    return archs, torch.tensor(policies, dtype=torch.float32), targets
