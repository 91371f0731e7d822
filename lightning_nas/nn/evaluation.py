"""Top-1 and loss of a network over batches held in memory (pair collection and QAT read it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(top-1 in percent, mean cross-entropy) over normalised batches."""
    model.eval()
    correct, loss, total = 0, 0.0, 0
    for images, labels in batches:
        logits = model(images)
        correct += int((logits.argmax(1) == labels).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
    return 100.0 * correct / total, loss / total
