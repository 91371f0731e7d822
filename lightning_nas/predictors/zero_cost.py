"""Zero-cost proxies with node-wise (per weight layer) statistics.

Every proxy works on any ``nn.Module`` classifier mapping images ``[N, C, H, W]`` to logits.
The *nodes* are the model's convolution and linear layers, in ``named_modules`` order, named by
their module name; each proxy returns one value per node plus an aggregate score (higher is
meant to predict a better network, as in the literature, except that no sign is flipped: the
aggregate is the published definition).

Design choices worth knowing:

* The model is never modified: proxies run on deep copies (weights are also only read through
  ``torch.autograd.grad``, so no ``.grad`` is left behind).
* Each pass re-seeds a forked RNG with ``seed``, so a proxy's value does not depend on which
  other proxies are computed with it. Passes that several proxies need (the loss
  forward/backward behind grad_norm, snip, fisher and grasp's first gradient) are shared inside
  :func:`compute_proxies`.
* Networks with no trainable path (e.g. NAS-Bench-201 cells of only ``none`` or
  ``skip_connect``) must give finite values: logs and log-determinants get explicit floors /
  ridges, and a last safety net maps anything non-finite to a finite value.
* Gradient proxies run in train mode (batch statistics in BN), as in the reference
  implementations; synflow removes batch norm (constant input would make batch statistics
  degenerate) and runs in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

NODE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)

# Floors that keep logs finite for degenerate (constant / all-zero) activations.
_LOG_FLOOR = 1e-12
_JACOV_K = 1e-5
_ZEN_MIXUP = 1e-2
_FINITE_CAP = 1e300


@dataclass
class ProxyResult:
    node_stats: dict[str, float]
    score: float


def node_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv / linear layers in module order: the nodes of the node-wise statistics."""
    return [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, NODE_TYPES)]


def _finite(value: float) -> float:
    # Safety net: degenerate networks must yield a defined number, never NaN / inf.
    if math.isnan(value):
        return 0.0
    return max(-_FINITE_CAP, min(_FINITE_CAP, value))


def _result(node_stats: dict[str, float], score: float) -> ProxyResult:
    return ProxyResult({k: _finite(float(v)) for k, v in node_stats.items()}, _finite(float(score)))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fork every RNG the seed touches, so computing a proxy leaves the caller's streams alone.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _capture_outputs(layers: Sequence[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor, name: str = name) -> None:
            outputs[name] = out
        handles.append(layer.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _grads(output: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """``autograd.grad`` where unused / non-differentiable inputs get zero gradients."""
    if not output.requires_grad or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(output, list(inputs), allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _strip_batchnorm(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _strip_batchnorm(child)


def _hamming_kernel(codes: torch.Tensor) -> torch.Tensor:
    """NASWOT kernel: number of units on which two samples' binary codes agree."""
    c = codes.flatten(1).to(torch.float32)
    # agree = D - hamming = D - s_i - s_j + 2 c_i.c_j: one matmul instead of two. float32 is
    # exact here (integer counts far below 2**24 for any layer that fits in memory per sample).
    ones = (c @ c.t()).to(torch.float64)
    s = c.sum(1).to(torch.float64)
    return c.shape[1] - s[:, None] - s[None, :] + 2.0 * ones


def _logdet_ridge(k: torch.Tensor) -> float:
    # +I: the kernel holds integer agreement counts, so a unit ridge barely moves a healthy
    # log-determinant but keeps identical codes (a singular kernel) finite.
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return float(torch.linalg.slogdet(k + eye)[1])


def _jacov_score(jac: torch.Tensor) -> float:
    """Jacobian covariance score of per-sample Jacobians ``[N, D]`` (Mellor et al., v1)."""
    j = jac.flatten(1).to(torch.float64)
    n = j.shape[0]
    if n < 2:
        return 0.0
    centred = j - j.mean(1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    # A sample with a constant Jacobian is treated as fully correlated with every other one:
    # the network cannot tell the inputs apart there, the worst case for this score.
    unit = torch.where(norm > 0, centred / norm.clamp_min(1e-300), torch.zeros_like(centred))
    corr = unit @ unit.t()
    dead = (norm.squeeze(1) == 0)
    if dead.any():
        corr[dead, :] = 1.0
        corr[:, dead] = 1.0
    eig = torch.linalg.eigvalsh(corr).clamp_min(0.0)
    return float(-(torch.log(eig + _JACOV_K) + 1.0 / (eig + _JACOV_K)).sum())


class _Session:
    """One model + batch; lazily runs the passes proxies need, each at most once."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        self.source = model
        self.images = images.detach()
        self.labels = labels.detach()
        self.seed = int(seed)

    def fresh_copy(self) -> nn.Module:
        model = copy.deepcopy(self.source)
        model.train()
        # In-place activations would overwrite the layer outputs the hooks keep for autograd.
        for m in model.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    @cached_property
    def model(self) -> nn.Module:
        return self.fresh_copy()

    @cached_property
    def layers(self) -> list[tuple[str, nn.Module]]:
        return node_layers(self.model)

    @property
    def weights(self) -> list[torch.Tensor]:
        return [m.weight for _, m in self.layers]

    @cached_property
    def loss_pass(self) -> dict[str, list[torch.Tensor]]:
        """CE loss forward/backward: weight gradients and fisher's activation statistics."""
        with _seeded(self.seed), _capture_outputs(self.layers) as acts:
            loss = F.cross_entropy(self.model(self.images), self.labels)
            names = [n for n, _ in self.layers]
            act_list = [acts[n] for n in names]
            grads = _grads(loss, self.weights + act_list)
        w_grads = [g.detach() for g in grads[: len(names)]]
        fisher = []
        for a, g in zip(act_list, grads[len(names):]):
            prod = (a.detach() * g.detach())
            # Per-channel saliency of removing that channel's activation (Theis et al.).
            per_channel = prod.flatten(2).sum(2) if prod.dim() > 2 else prod.reshape(prod.shape[0], -1)
            fisher.append(0.5 * per_channel.pow(2).mean(0).sum())
        return {"weight_grads": w_grads, "fisher": fisher}

    def names(self) -> list[str]:
        return [n for n, _ in self.layers]


def _from_session(fn: Callable[[_Session], ProxyResult]) -> Callable[..., ProxyResult]:
    def proxy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> ProxyResult:
        return fn(_Session(model, images, labels, seed))

    proxy.__name__ = fn.__name__.lstrip("_")
    proxy.__doc__ = fn.__doc__
    return proxy


def _sum_result(names: list[str], values: Sequence[float]) -> ProxyResult:
    stats = dict(zip(names, (float(v) for v in values)))
    return _result(stats, sum(stats.values()))


def _grad_norm(s: _Session) -> ProxyResult:
    """Per layer: L2 norm of the loss gradient of the weight; score: their sum."""
    return _sum_result(s.names(), [g.norm() for g in s.loss_pass["weight_grads"]])


def _snip(s: _Session) -> ProxyResult:
    """Per layer: sum |w * dL/dw| (connection sensitivity); score: their sum."""
    return _sum_result(s.names(), [(w.detach() * g).abs().sum() for w, g in zip(s.weights, s.loss_pass["weight_grads"])])


def _fisher(s: _Session) -> ProxyResult:
    """Per layer: summed channel Fisher saliency of the layer output; score: their sum."""
    return _sum_result(s.names(), s.loss_pass["fisher"])


def _grasp(s: _Session) -> ProxyResult:
    """Per layer: sum(-w * Hg) with H the loss Hessian and g its gradient; score: their sum."""
    g = s.loss_pass["weight_grads"]
    with _seeded(s.seed):
        loss = F.cross_entropy(s.model(s.images), s.labels)
        grads = _grads(loss, s.weights, create_graph=True)
        z = sum((gi * gg).sum() for gi, gg in zip(g, grads) if gg.requires_grad)
        hg = _grads(z, s.weights) if isinstance(z, torch.Tensor) else [torch.zeros_like(w) for w in s.weights]
    return _sum_result(s.names(), [(-w.detach() * h).sum() for w, h in zip(s.weights, hg)])


def _jacov(s: _Session) -> ProxyResult:
    """Jacobian covariance of d(sum logits)/d(input); per layer: same on the layer output."""
    model = s.fresh_copy()
    layers = node_layers(model)
    x = s.images.clone().requires_grad_(True)
    with _seeded(s.seed), _capture_outputs(layers) as acts:
        out = model(x)
        names = [n for n, _ in layers]
        grads = _grads(out.sum(), [x] + [acts[n] for n in names])
    stats = {n: _jacov_score(g) for n, g in zip(names, grads[1:])}
    return _result(stats, _jacov_score(grads[0]))


def _synflow(s: _Session) -> ProxyResult:
    """Per layer: sum(w * dR/dw), R = sum of outputs of the |weight|, BN-free, float64 net on ones."""
    model = s.fresh_copy()
    _strip_batchnorm(model)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    layers = node_layers(model)
    weights = [m.weight for _, m in layers]
    ones = torch.ones((1, *s.images.shape[1:]), dtype=torch.float64, device=s.images.device)
    with _seeded(s.seed):
        grads = _grads(model(ones).sum(), weights)
    return _sum_result([n for n, _ in layers], [(w.detach() * g).sum() for w, g in zip(weights, grads)])


def _nwot(s: _Session) -> ProxyResult:
    """NASWOT log|K| of binary activation codes.

    Score: the published form, codes of every ReLU module's input (falls back to the layers'
    outputs when the model has no ReLU modules). Per layer: codes of the layer's output sign.
    """
    model = s.fresh_copy()
    layers = node_layers(model)
    n = s.images.shape[0]
    relu_kernel = torch.zeros(n, n, dtype=torch.float64, device=s.images.device)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]

    def relu_hook(_m: nn.Module, inp: tuple) -> None:
        nonlocal relu_kernel
        relu_kernel = relu_kernel + _hamming_kernel(inp[0].detach() > 0)

    handles = [m.register_forward_pre_hook(relu_hook) for m in relus]
    try:
        with torch.no_grad(), _seeded(s.seed), _capture_outputs(layers) as acts:
            model(s.images)
            kernels = {name: _hamming_kernel(acts[name] > 0) for name, _ in layers}
    finally:
        for h in handles:
            h.remove()
    if not relus:
        relu_kernel = sum(kernels.values(), relu_kernel)
    return _result({k: _logdet_ridge(v) for k, v in kernels.items()}, _logdet_ridge(relu_kernel))


def _feature_module(model: nn.Module) -> tuple[nn.Module, bool]:
    """Where Zen reads the features: the input of the global pool if any, else of the last linear."""
    pools = [m for m in model.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d))]
    if pools:
        return pools[-1], True
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1], True
    return model, False


def _zen(s: _Session) -> ProxyResult:
    """Zen-score: log E|f(x) - f(x + 0.01 e)| on Gaussian weights and inputs + BN variance terms.

    Per layer: log of the mean absolute perturbation response of the layer output.
    """
    model = s.fresh_copy()
    layers = node_layers(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    feat_module, use_input = _feature_module(model)
    with _seeded(s.seed), torch.no_grad():
        for m in model.modules():
            if isinstance(m, NODE_TYPES):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        x = torch.randn_like(s.images)
        x_mix = x + _ZEN_MIXUP * torch.randn_like(s.images)

        def run(inp: torch.Tensor, record_bn: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[float]]:
            feats: list[torch.Tensor] = []
            bn_vars: list[float] = []
            handles = [feat_module.register_forward_hook(
                lambda _m, i, o: feats.append(i[0] if use_input else o))]
            if record_bn:
                for bn in bns:
                    handles.append(bn.register_forward_hook(
                        lambda _m, i, _o: bn_vars.append(float(i[0].transpose(0, 1).flatten(1).var(1, unbiased=False).mean()))))
            try:
                with _capture_outputs(layers) as acts:
                    out = model(inp)
                    acts = dict(acts)
            finally:
                for h in handles:
                    h.remove()
            return acts, (feats[-1] if feats else out), bn_vars

        acts_a, feat_a, bn_vars = run(x, record_bn=True)
        acts_b, feat_b, _ = run(x_mix, record_bn=False)

    def log_delta(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.log(float((a - b).abs().mean()) + _LOG_FLOOR)

    stats = {name: log_delta(acts_a[name], acts_b[name]) for name, _ in layers}
    bn_term = sum(0.5 * math.log(v + _LOG_FLOOR) for v in bn_vars)
    return _result(stats, log_delta(feat_a, feat_b) + bn_term)


def _params(s: _Session) -> ProxyResult:
    """Per layer: its parameter count; score: all trainable parameters of the model."""
    stats = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in node_layers(s.source)}
    return _result(stats, sum(p.numel() for p in s.source.parameters() if p.requires_grad))


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        return int(out[0].numel() * kernel)
    # Linear: every output element costs in_features multiply-accumulates.
    return int(out[0].numel() * module.in_features)


def _flops(s: _Session) -> ProxyResult:
    """Per layer: multiply-accumulates for one image; score: their sum (in MACs)."""
    model = s.fresh_copy().eval()
    layers = node_layers(model)
    with torch.no_grad(), _capture_outputs(layers) as acts:
        model(s.images[:1])
        stats = {name: _layer_macs(m, acts[name]) for name, m in layers}
    return _sum_result(list(stats), list(stats.values()))


_SESSION_PROXIES: dict[str, Callable[[_Session], ProxyResult]] = {
    "grad_norm": _grad_norm,
    "snip": _snip,
    "grasp": _grasp,
    "fisher": _fisher,
    "jacov": _jacov,
    "synflow": _synflow,
    "nwot": _nwot,
    "zen": _zen,
    "params": _params,
    "flops": _flops,
}

PROXIES: dict[str, Callable[..., ProxyResult]] = {k: _from_session(v) for k, v in _SESSION_PROXIES.items()}


def _check_name(name: str) -> None:
    if name not in PROXIES:
        raise ValueError(f"unknown zero-cost proxy {name!r}; available: {', '.join(PROXIES)}")


def compute_proxy(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> ProxyResult:
    """Compute one proxy: node-wise statistics (per conv / linear layer) and the aggregate score."""
    _check_name(name)
    return PROXIES[name](model, images, labels, seed)


def compute_proxies(
    names: Sequence[str], model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 0
) -> dict[str, ProxyResult]:
    """Several proxies on one model and batch, sharing the passes they have in common.

    Gives the same values as calling :func:`compute_proxy` for each name.
    """
    for name in names:
        _check_name(name)
    session = _Session(model, images, labels, seed)
    return {name: _SESSION_PROXIES[name](session) for name in names}
