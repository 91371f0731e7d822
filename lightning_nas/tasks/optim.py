"""Optimizers and learning-rate schedules shared by the tasks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_on_bn_and_bias: bool = True) -> list[dict]:
    """Weight decay on weights only: batch-norm parameters and biases are left undecayed."""
    if not no_decay_on_bn_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: Iterable[dict], name: str, lr: float, momentum: float = 0.9,
                    nesterov: bool = True) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, adam, adamw")


def warmup_cosine(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0):
    """Per-step multiplier: linear warm-up, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0) -> dict:
    """A Lightning ``lr_scheduler`` config stepping every optimizer step."""
    if schedule == "cosine":
        lam = warmup_cosine(total_steps, warmup_steps)
    elif schedule == "constant":
        lam = (lambda step: min(1.0, (step + 1) / warmup_steps)) if warmup_steps else (lambda step: 1.0)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: cosine, constant")
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lam), "interval": "step"}
