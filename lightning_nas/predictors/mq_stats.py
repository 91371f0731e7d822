"""Per-layer statistics of a trained network for mixed-precision proxies, computed once on one batch.

For every searchable layer: its weight, the loss gradient of the weight, Hutchinson's estimate of
the Hessian diagonal and trace, its input activation on a few images, and the quantization
perturbation ``W - Q_b(W)`` (with the benchmark's clipped quantizer, :func:`~lightning_nas.nn.ptq.clipped_quantize`)
for every candidate bit width; per-layer scalars for the hand-made proxies: parameter count, MACs,
OMPQ's summed orthogonality, and the node-wise zero-cost values of
:mod:`~lightning_nas.predictors.zero_cost` (snip, fisher, synflow, grad_norm). The result is a
torch-free :class:`~lightning_nas.spaces.emq_programs.LayerStatistics` the evolution reads.

Gradient and Hessian statistics run in eval mode (running BN statistics): the network is trained
and is quantized as it will be evaluated. The zero-cost values follow their own definitions
(train mode; see :mod:`.zero_cost`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.ptq import CLIP_RATIOS, clipped_quantize
from ..spaces.emq_programs import LayerStatistics
from .zero_cost import compute_proxies

ZERO_COST = ("snip", "fisher", "synflow", "grad_norm")


def hutchinson(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], samples: int,
               generator: torch.Generator) -> tuple[list[float], list[torch.Tensor]]:
    """Hutchinson's estimates per parameter tensor: (trace of its Hessian block, Hessian diagonal).

    With Rademacher vectors ``v``, ``E[v * Hv]`` is the diagonal and ``E[v . Hv]`` the trace; each
    tensor's block is estimated from the same draws (one Hessian-vector product per sample).
    """
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    params = list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    diagonals = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        vectors = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(p) * 2 - 1 for p in params]
        products = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True)
        for d, v, hv in zip(diagonals, vectors, products):
            d.add_(v * hv.detach())
    diagonals = [d / samples for d in diagonals]
    return [float(d.sum()) for d in diagonals], diagonals


def orthogonality(features: Sequence[torch.Tensor]) -> np.ndarray:
    """OMPQ's orthogonality of layer features ``X_i`` (``[N, d_i]``):
    ``||X_j^T X_i||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F)``, from the ``N x N`` Gram matrices
    (``||X_j^T X_i||_F^2 = <K_i, K_j>_F`` and ``||X_i^T X_i||_F = ||K_i||_F``)."""
    grams = [(x.reshape(x.shape[0], -1).double() @ x.reshape(x.shape[0], -1).double().T) for x in features]
    norms = torch.stack([g.norm() for g in grams])
    flat = torch.stack([g.reshape(-1) for g in grams])
    inner = flat @ flat.T
    return (inner / (norms[:, None] * norms[None, :]).clamp_min(1e-300)).numpy()


class _HardSigmoid(nn.Module):
    """``nn.Hardsigmoid`` by the same formula (``relu6(x + 3) / 6``) in ops that torch differentiates
    twice: ``hardsigmoid_backward`` has no derivative, so Hessian-vector products through a
    squeeze-excite gate would fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def _twice_differentiable(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Hardsigmoid):
            setattr(module, name, _HardSigmoid())
        else:
            _twice_differentiable(child)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_image = output[0].numel()
    if isinstance(module, nn.Conv2d):
        return per_image * math.prod(module.kernel_size) * (module.in_channels // module.groups)
    return per_image * module.in_features


def _activation_matrix(x: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[C, N * H * W]`` (``[N, F]`` -> ``[F, N]``)."""
    x = x.detach().double()
    x = x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.numpy()


def compute_layer_statistics(model: nn.Module, layers: Sequence[str], images: torch.Tensor, labels: torch.Tensor,
                             bit_choices: Sequence[int] = (2, 3, 4), activation_bits: int = 8,
                             hessian_samples: int = 32, activation_images: int = 4,
                             clip_ratios: Sequence[float] = CLIP_RATIOS, seed: int = 0,
                             zero_cost: Sequence[str] = ZERO_COST) -> LayerStatistics:
    """Statistics of ``layers`` (qualified names of conv / linear layers) on one labelled batch."""
    network = copy.deepcopy(model).eval()
    for m in network.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    _twice_differentiable(network)
    modules = [network.get_submodule(name) for name in layers]
    weights = [m.weight for m in modules]
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in zip(layers, modules):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            inputs[name], outputs[name] = args[0].detach(), out.detach()
        handles.append(module.register_forward_hook(hook))
    try:
        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(network(images), labels)

        generator = torch.Generator().manual_seed(seed)
        traces, diagonals = hutchinson(loss_fn, weights, hessian_samples, generator)
        grads = torch.autograd.grad(loss_fn(), weights)
    finally:
        for handle in handles:
            handle.remove()
    orth = orthogonality([outputs[name] for name in layers])
    gamma = orth.sum(axis=1) - np.diag(orth)
    zc = compute_proxies(list(zero_cost), model, images, labels, seed=seed) if zero_cost else {}

    tensors = []
    for name, w, g, h in zip(layers, weights, grads, diagonals):
        flat = w.detach().reshape(w.shape[0], -1).double()
        quantized = [clipped_quantize(w.detach(), b, clip_ratios)[0].reshape(w.shape[0], -1).double()
                     for b in bit_choices]
        tensors.append({
            "weight": flat.numpy(),
            "grad": g.detach().reshape(w.shape[0], -1).double().numpy(),
            "hessian": h.reshape(w.shape[0], -1).double().numpy(),
            "act": _activation_matrix(inputs[name][:activation_images]),
            "perturb": [(flat - q).numpy() for q in quantized],
            "qweight": [q.numpy() for q in quantized],
        })
    scalars = {
        "params": np.array([float(w.numel()) for w in weights]),
        "macs": np.array([float(_macs(m, outputs[n])) for n, m in zip(layers, modules)]),
        "hessian_trace": np.array(traces),
        "ompq_gamma": gamma,
    }
    for proxy, result in zc.items():
        scalars[proxy] = np.array([result.node_stats[name] for name in layers])
    meta = {"batch": int(images.shape[0]), "hessian_samples": hessian_samples, "seed": seed,
            "activation_images": activation_images}
    return LayerStatistics(list(layers), tuple(int(b) for b in bit_choices), tensors, scalars, activation_bits, meta)
