"""Classification accuracy in percent: the one unit of every accuracy the package logs or writes.

``train/acc``, ``val/acc``, ``val/acc@NAME``, ``test/top1``, the ``top1`` of pair stores,
``subnets.csv`` and ``latency.json``, and int8 agreement are all percent (0-100). Both forms below
are torchmetrics' micro-averaged multiclass accuracy (the share of rows whose label is among their
``top_k`` largest logits) times 100, so a figure computed per batch and one accumulated over batches
mean the same thing.

Argument validation is off: it would sync the host with the device on every batch (``torch.unique``
of the labels), and the labels come from the package's own data modules; a label outside
``[0, num_classes)`` simply never counts as correct.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

__all__ = ["PercentAccuracy", "percent_accuracy"]


def percent_accuracy(preds: Tensor, target: Tensor, top_k: int = 1, num_classes: int | None = None) -> Tensor:
    """Top-``top_k`` accuracy of one batch, in percent, as a 0-dim float tensor on ``preds``' device.

    ``preds`` are logits ``(N, C)`` (then ``num_classes`` defaults to ``C``) or predicted class
    indices ``(N,)`` (then ``num_classes`` is required and ``top_k`` must be 1).
    """
    if num_classes is None:
        if preds.dim() != 2:
            raise ValueError(f"class indices of shape {tuple(preds.shape)} need num_classes")
        num_classes = int(preds.shape[1])
    value = multiclass_accuracy(preds, target, num_classes, average="micro", top_k=top_k, validate_args=False)
    return value * 100.0


class PercentAccuracy(MulticlassAccuracy):
    """Top-``top_k`` accuracy in percent over every batch since the last ``reset()``.

    A torchmetrics ``Metric``: register it as a module attribute so it follows the device, and log
    the object itself from a LightningModule (``self.log("val/acc", metric)``); Lightning then
    computes it once per epoch, synchronised over DDP ranks, and resets it.
    """

    def __init__(self, num_classes: int, top_k: int = 1, **kwargs) -> None:
        super().__init__(num_classes, top_k=top_k, average="micro", validate_args=False, **kwargs)

    def compute(self) -> Tensor:
        return super().compute() * 100.0

