"""The progressive-shrinking training step, as plain functions.

Shared by the supernet LightningModule (``backward=self.manual_backward``) and the throughput
benchmark (``backward=Tensor.backward``). One step runs several sampled subnets on the same batch
and lets their gradients accumulate, so the caller makes a single optimizer step for all of them;
each subnet's graph is freed by its own backward, so memory stays at one subnet's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import percent_accuracy

__all__ = ["shrinking_step", "soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a soft target distribution, averaged over the batch."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _backward(loss: Tensor) -> None:
    loss.backward()


def shrinking_step(
    supernet: nn.Module,
    images: Tensor,
    labels: Tensor,
    subnet_configs: Sequence[Mapping[str, Any]],
    teacher_logits: Tensor | None = None,
    kd_ratio: float = 1.0,
    label_smoothing: float = 0.1,
    backward: Callable[[Tensor], None] = _backward,
) -> dict[str, Tensor]:
    """Forward and backward every subnet of ``subnet_configs`` on one batch.

    Each subnet's loss is ``CE(logits, labels; label_smoothing)`` plus, when ``teacher_logits``
    is given and ``kd_ratio > 0``, ``kd_ratio * soft_cross_entropy(logits, softmax(teacher))``.
    ``backward(loss)`` is called once per subnet, so gradients of all subnets add up (they are
    summed, not averaged, as in once-for-all); the caller zeroes gradients before and steps the
    optimizer after. ``supernet`` must provide ``set_active(config)`` (directly, or on ``.module``
    for wrappers such as DDP, which are then used for the forward pass).

    Returns:
        ``loss``: mean loss over the subnets; ``top1``: mean top-1 accuracy (percent) of the
        subnets on the batch; ``num_subnets``. All are detached tensors (no host sync).
    """
    if not subnet_configs:
        raise ValueError("shrinking_step needs at least one subnet config")
    target = (
        supernet.module if hasattr(supernet, "module") and not hasattr(supernet, "set_active") else supernet
    )
    soft_targets = None
    if teacher_logits is not None and kd_ratio > 0:
        soft_targets = F.softmax(teacher_logits.detach().float(), dim=1)

    total_loss = images.new_zeros((), dtype=torch.float32)
    total_top1 = images.new_zeros((), dtype=torch.float32)
    for config in subnet_configs:
        target.set_active(config)
        logits = supernet(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if soft_targets is not None:
            loss = loss + kd_ratio * soft_cross_entropy(logits, soft_targets)
        backward(loss)
        with torch.no_grad():
            total_loss += loss.detach().float()
            total_top1 += percent_accuracy(logits, labels)
    n = len(subnet_configs)
    return {
        "loss": total_loss / n,
        "top1": total_top1 / n,
        "num_subnets": torch.tensor(n),
    }
