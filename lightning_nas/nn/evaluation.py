"""Top-1 and loss of a network over batches held in memory (pair collection and QAT read it)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .metrics import PercentAccuracy

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(top-1 in percent, mean cross-entropy) over normalised batches."""
    model.eval()
    accuracy: PercentAccuracy | None = None
    loss, total = 0.0, 0
    for images, labels in batches:
        logits = model(images)
        if accuracy is None:
            accuracy = PercentAccuracy(num_classes=int(logits.shape[1])).to(logits.device)
        accuracy.update(logits, labels)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
    if accuracy is None:
        raise ValueError("evaluate needs at least one batch")
    return float(accuracy.compute()), loss / total
