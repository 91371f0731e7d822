"""Batch-norm recalibration: exact running statistics of a (sub)network on given images.

A subnet run inside a supernet (or just extracted from it) inherits batch-norm statistics that
were accumulated over many different subnets; before evaluating it, its statistics must be
recomputed on a slice of training data. This works for standard ``nn.BatchNorm*`` layers and for
:class:`~lightning_nas.nn.elastic.DynamicBatchNorm2d` (which sees only its active channels).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_batchnorm"]


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch.

    Batches are merged with Chan's parallel formula in float64, so the result is the mean and
    variance over all images together, not an average of per-batch values (which is what a
    ``momentum=None`` running average gives for the variance, and for the mean too when batches
    differ in size).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        # One batch's moments in float32 (two-pass, accurate to about 1e-7 relative over a batch),
        # merged in float64: converting whole activations to float64 cost 3 times the forward pass.
        var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
        var, mean = var.double(), mean.double()
        m2 = var * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.numel() != self.mean.numel():
            raise RuntimeError(
                f"a batch norm saw {mean.numel()} channels after {self.mean.numel()}: the active "
                "subnet must not change during recalibration"
            )
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def _images(batch: Tensor | Sequence) -> Tensor:
    # DataLoaders yield (images, labels) pairs; plain tensors are taken as images
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"expected a tensor of images or an (images, ...) sequence, got {type(batch).__name__}")


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Tensor | Sequence],
    max_images: int | None = None,
    device: torch.device | str | None = None,
    memory_format: torch.memory_format | None = None,
) -> nn.Module:
    """Reset every batch norm's running statistics and set them to the exact statistics of
    ``batches``.

    The model runs in train mode (each layer normalises with its batch statistics, as when the
    reference statistics are defined) while forward pre-hooks accumulate every batch norm's input
    moments over all images. Afterwards ``running_mean`` is the mean and ``running_var`` the
    unbiased variance over all images (``num_batches_tracked`` counts the batches), for the
    channels the layer actually saw; unseen channels of dynamic layers stay at the reset values
    (0 / 1). Momentum and the train / eval mode of every module are restored.

    Args:
        model: any network; its active subnet must not change during the call.
        batches: image tensors or ``(images, ...)`` tuples, e.g. a DataLoader.
        max_images: stop after this many images (the last batch is truncated).
        device: move images here first (default: the model's parameter device).
        memory_format: convert images to this memory format (e.g. ``torch.channels_last``).

    Returns:
        ``model``, recalibrated in place.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    moments = {m: _Moments() for m in norms}
    handles = [m.register_forward_pre_hook(lambda mod, args: moments[mod].update(args[0])) for m in norms]
    for m in norms:
        m.reset_running_stats()
    seen = batches_run = 0
    try:
        model.train()
        for batch in batches:
            images = _images(batch)
            if max_images is not None:
                if seen >= max_images:
                    break
                images = images[: max_images - seen]
            images = images.to(device, non_blocking=True)
            if memory_format is not None:
                images = images.contiguous(memory_format=memory_format)
            model(images)
            seen += images.shape[0]
            batches_run += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_batchnorm got no images")
    for m in norms:
        stats = moments[m]
        # the forward passes updated the running statistics too; overwrite with exact values
        m.reset_running_stats()
        if stats.mean is None or stats.m2 is None:
            continue  # layer not on the active path
        c = stats.mean.numel()
        m.running_mean[:c] = stats.mean.to(m.running_mean.dtype)
        m.running_var[:c] = (stats.m2 / max(stats.count - 1, 1)).to(m.running_var.dtype)
        m.num_batches_tracked.fill_(batches_run)
    return model
