"""Cheap, honest post-training quantization of a trained network under per-layer weight bits.

Weights: the project's symmetric per-output-channel grid (:func:`~lightning_nas.nn.quant.fake_quantize`
on :func:`~lightning_nas.nn.quant.symmetric_qrange`), but each channel's clipping value is chosen
among ``ratio x max|w|`` for a grid of ratios by the smallest squared error: at 2 and 3 bits the
max-abs scale wastes most of the grid on a few outliers. Activations: the project's input
quantizers (:func:`~lightning_nas.nn.quantize_model.attach_quantizers`) at ``activation_bits``,
ranges calibrated once on the float network. Batch norm: re-estimated for every configuration on
held-out training images with the quantized weights and activations in place
(:func:`~lightning_nas.nn.bn_recalibration.recalibrate_batchnorm`), which repairs the shift of the
channel means and variances that low-bit weights cause. Optionally (``rounding_steps > 0``) each
layer's rounding is then learned, AdaRound-style (:func:`adaround`), to reproduce the float layer's
output on calibration images; with the float network's inputs this depends only on the layer and
its bit width, so it is done once per (layer, bit width) and shared by every configuration.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bn_recalibration import recalibrate_batchnorm
from .evaluation import evaluate
from .quant import fake_quantize, symmetric_qrange
from .quantize_model import attach_quantizers, calibrate_activation_ranges

#: Clipping ratios tried per channel (fractions of the channel's largest magnitude).
CLIP_RATIOS: tuple[float, ...] = tuple(round(0.05 + 0.01 * i, 2) for i in range(96))


@torch.no_grad()
def clipped_quantize(weight: torch.Tensor, bits: int, ratios: Sequence[float] = CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized weight, chosen clipping ratio per output channel) minimising the squared error."""
    qmin, qmax = symmetric_qrange(bits)
    w = weight.detach().reshape(weight.shape[0], -1)
    max_abs = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.full((w.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    best_q = torch.zeros_like(w)
    best_ratio = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    for ratio in ratios:
        q = fake_quantize(w, max_abs * (ratio / qmax), qmin, qmax)
        error = (w - q).square().sum(dim=1)
        better = error < best
        best = torch.where(better, error, best)
        best_q[better] = q[better]
        best_ratio[better] = ratio
    return best_q.reshape(weight.shape), best_ratio


def _layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)


def adaround(module: nn.Module, weight: torch.Tensor, bits: int, ratio: torch.Tensor, inputs: torch.Tensor,
             steps: int, batch_size: int = 32, lr: float = 1e-3, reg: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Learned rounding (Nagel et al., 2020) of ``weight`` on the clipped grid of ``ratio``.

    Each weight rounds down or up; a rectified-sigmoid variable per weight, started at the
    weight's fractional part, is trained by Adam to minimise the squared error of the layer's
    output on ``inputs`` plus a regulariser (its exponent annealed from 20 to 2 after a fifth of
    the steps) that drives every variable to 0 or 1. Returns the fake-quantized weight.
    """
    zeta, gamma = 1.1, -0.1
    qmin, qmax = symmetric_qrange(bits)
    w = weight.detach()
    scale = (w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) * ratio / qmax)
    scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    warmup = steps // 5
    with torch.no_grad():
        target = _layer_forward(module, inputs, w)
    with torch.enable_grad():  # callers quantize weights under no_grad
        for step in range(steps):
            rows = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=generator)
            soft = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0, 1)
            quantized = scale * torch.clamp(floor + soft, qmin, qmax)
            loss = (_layer_forward(module, inputs[rows], quantized) - target[rows]).square().sum() / len(rows)
            if step >= warmup:
                beta = 20 + (2 - 20) * (step - warmup) / max(steps - warmup, 1)
                loss = loss + reg * (1 - (2 * soft - 1).abs().pow(beta)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return scale * torch.clamp(floor + (v >= 0).to(w.dtype), qmin, qmax)


def _original_weight(model: nn.Module, name: str) -> torch.Tensor:
    # attach_quantizers parametrizes the weight; the stored tensor is its "original".
    return model.get_submodule(name).parametrizations.weight.original


class PTQEvaluator:
    """Top-1 of a trained network quantized post-training under per-layer weight bits.

    Args:
        model: the trained float network (copied; the original is not touched).
        layers: names of the layers whose weight bits a configuration chooses.
        fixed_layers: other conv / linear layers, quantized at ``fixed_bits`` (stem, classifier).
        bn_images: normalised held-out training images (batches) for calibration and BN re-estimation.
        test_batches: normalised ``(images, labels)`` batches the top-1 is measured on.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], fixed_layers: Sequence[str],
                 bn_images: Sequence[torch.Tensor], test_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 activation_bits: int = 8, fixed_bits: int = 8, act_percentile: float = 99.99,
                 clip_ratios: Sequence[float] = CLIP_RATIOS, rounding_steps: int = 0,
                 rounding_images: int = 256) -> None:
        self.layers, self.fixed_layers = list(layers), list(fixed_layers)
        # Channels-last convolutions ran 1.4x faster than NCHW on these networks (ResNet-20, CPU);
        # the layout changes no value.
        self.bn_images = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in bn_images]
        self.test_batches = [(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y)
                             for x, y in test_batches]
        self.clip_ratios = tuple(clip_ratios)
        self.rounding_steps = rounding_steps
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        names = self.layers + self.fixed_layers
        self._float_model = copy.deepcopy(model).eval() if rounding_steps > 0 else None
        self._layer_inputs = self._capture_inputs(names, rounding_images) if rounding_steps > 0 else {}
        self.float_weights = {n: self.model.get_submodule(n).weight.detach().clone() for n in names}
        # Weight quantizers stay at full precision: the clipped weights are written in directly.
        attach_quantizers(self.model, {n: (None, activation_bits) for n in names})
        calibrate_activation_ranges(self.model, self.bn_images, percentile=act_percentile)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        with torch.no_grad():
            for name in self.fixed_layers:
                _original_weight(self.model, name).copy_(self.quantized_weight(name, fixed_bits))

    @torch.no_grad()
    def _capture_inputs(self, names: Sequence[str], images: int) -> dict[str, torch.Tensor]:
        """Every layer's input in the float network on the first ``images`` calibration images."""
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = [self._float_model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: captured[n].append(args[0].detach())) for n in names]
        try:
            seen = 0
            for batch in self.bn_images:
                if seen >= images:
                    break
                self._float_model(batch[: images - seen])
                seen += len(batch[: images - seen])
        finally:
            for handle in handles:
                handle.remove()
        return {n: torch.cat(xs) for n, xs in captured.items()}

    def quantized_weight(self, name: str, bits: int) -> torch.Tensor:
        """The quantized weight of one layer (computed once per layer and bit width): clipped, and
        with learned rounding when ``rounding_steps > 0``."""
        if (name, bits) not in self._cache:
            quantized, ratio = clipped_quantize(self.float_weights[name], bits, self.clip_ratios)
            if self.rounding_steps > 0:
                module = self._float_model.get_submodule(name)
                quantized = adaround(module, self.float_weights[name], bits, ratio, self._layer_inputs[name],
                                     self.rounding_steps)
            self._cache[(name, bits)] = quantized
        return self._cache[(name, bits)]

    def evaluate(self, bits: Sequence[int]) -> tuple[float, float]:
        """(top-1 %, loss) of the configuration giving ``bits[i]`` weight bits to ``layers[i]``."""
        if len(bits) != len(self.layers):
            raise ValueError(f"a configuration has {len(self.layers)} bit widths, got {len(bits)}")
        with torch.no_grad():
            for name, b in zip(self.layers, bits):
                _original_weight(self.model, name).copy_(self.quantized_weight(name, int(b)))
        recalibrate_batchnorm(self.model, self.bn_images)
        return evaluate(self.model, self.test_batches)
