"""Dynamic (elastic) layers of once-for-all supernets.

Each layer owns the weights of its largest configuration and runs a prefix slice of them:

* :class:`DynamicConv2d` - dense convolution (pointwise in practice) with elastic input channels
  (taken from the input tensor) and elastic output channels (``active_out_channels``).
* :class:`DynamicDepthwiseConv2d` - depthwise convolution with elastic channels and an elastic
  kernel: a smaller kernel is the centre of the next larger one passed through a learned
  ``(k*k) x (k*k)`` transformation matrix (7 -> 5 -> 3), initialised to the identity.
* :class:`DynamicBatchNorm2d` - batch norm whose statistics and affine parameters are sliced to the
  input's channel count.
* :class:`DynamicLinear` - linear layer with elastic in / out features.
* :class:`DynamicSqueezeExcite` - squeeze-excite over elastic channels, built from two
  :class:`DynamicConv2d`.

Quantization hook protocol: every dynamic conv / linear has the attributes ``weight_quantizer``
and ``input_quantizer`` (``None`` by default). When set to a module (which registers it as a
submodule, so ``.to()`` and ``state_dict`` see it), ``forward`` applies ``weight_quantizer`` to the
final active weight (sliced and, for depthwise convs, kernel-transformed) and ``input_quantizer``
to the input tensor before the operation. :meth:`active_weight` returns the weight without the
quantizer, which is what subnet extraction copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lightning_nas.spaces.ofa_mbv3 import make_divisible

__all__ = [
    "DynamicBatchNorm2d",
    "DynamicConv2d",
    "DynamicDepthwiseConv2d",
    "DynamicLinear",
    "DynamicSqueezeExcite",
    "QuantHookMixin",
    "copy_active_weights",
    "depthwise_conv2d",
    "pointwise_conv2d",
]


class QuantHookMixin:
    """Adds the ``weight_quantizer`` / ``input_quantizer`` slots of the quantization protocol.

    The slots live in ``_modules`` from the start, so assigning a module later registers it as a
    submodule and assigning ``None`` removes it from ``named_modules`` again.
    """

    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    def _init_quant_hooks(self) -> None:
        self.register_module("weight_quantizer", None)  # type: ignore[attr-defined]
        self.register_module("input_quantizer", None)  # type: ignore[attr-defined]

    def _quantize(self, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        # one dict lookup each: _modules holds the slots (see _init_quant_hooks)
        modules = self._modules  # type: ignore[attr-defined]
        wq, iq = modules["weight_quantizer"], modules["input_quantizer"]
        if wq is not None:
            weight = wq(weight)
        if iq is not None:
            x = iq(x)
        return x, weight


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution computed as one matrix multiply over the ``N*H*W`` positions.

    For NHWC (channels-last) or 1x1 maps the permutes are free views and the result comes back
    channels-last. On the small maps of the late stages this beats oneDNN's convolution
    (forward and backward), e.g. about 3x for the 960 -> 1280 feature-mix layer on a 1x1 map.
    """
    out = F.linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], weight.shape[1]), bias)
    return out.permute(0, 3, 1, 2)


#: Largest ``H*W`` of a channels-last map for which :func:`pointwise_conv2d` is used; above it
#: oneDNN's blocked 1x1 convolution is as fast or faster on CPU (measured on AVX-512 Xeons).
MATMUL_POINTWISE_MAX_POSITIONS = 16


def _pointwise_as_matmul(x: Tensor) -> bool:
    if x.device.type != "cpu":  # measured on CPU only; cuDNN picks its own 1x1 algorithms
        return False
    positions = x.shape[2] * x.shape[3]
    if positions == 1:
        return True
    return positions <= MATMUL_POINTWISE_MAX_POSITIONS and x.is_contiguous(memory_format=torch.channels_last)


class DynamicConv2d(QuantHookMixin, nn.Module):
    """Dense convolution with elastic input and output channels (prefix slices of the weight).

    Input channels follow the input tensor; output channels are ``active_out_channels``.
    Padding is ``kernel_size // 2`` ("same" for odd kernels).
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.max_in_channels = max_in_channels
        self.max_out_channels = max_out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(max_out_channels, max_in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(max_out_channels)) if bias else None
        self.active_out_channels = max_out_channels
        self._init_quant_hooks()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He init on fan-out, the MobileNet convention; biases start at zero
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def active_weight(self, in_channels: int) -> Tensor:
        """The weight of the active ``(active_out_channels, in_channels)`` slice."""
        out = self.active_out_channels
        if out == self.max_out_channels and in_channels == self.max_in_channels:
            return self.weight  # no slice: avoids a copy and keeps mkldnn's weight fast path
        return self.weight[:out, :in_channels]

    def active_bias(self) -> Tensor | None:
        if self.bias is None or self.active_out_channels == self.max_out_channels:
            return self.bias
        return self.bias[: self.active_out_channels]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.active_weight(x.shape[1])
        x, weight = self._quantize(x, weight)
        if self.kernel_size == 1 and self.stride == 1 and _pointwise_as_matmul(x):
            return pointwise_conv2d(x, weight, self.active_bias())
        return F.conv2d(x, weight, self.active_bias(), self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.max_in_channels}, {self.max_out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bias={self.bias is not None}, active_out={self.active_out_channels}"
        )


def depthwise_conv2d(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """Depthwise "same" convolution (padding ``k // 2``) that skips taps which only see padding.

    On an ``h x w`` map, a tap further than ``h - 1`` rows (``w - 1`` columns) from the centre
    multiplies zero padding for every output position, for any stride, and gets a zero gradient.
    Cropping the kernel to ``min(k, 2h - 1) x min(k, 2w - 1)`` therefore gives identical outputs
    and gradients while the late stages of a network (2x2 and 1x1 maps at 32x32 inputs) run a
    3x3 or 1x1 kernel instead of 7x7; oneDNN's depthwise kernels are very slow on such tiny maps
    with large padding. A 1x1 kernel is a per-channel scale and is computed as one.
    """
    k = weight.shape[-1]
    h, w = x.shape[-2:]
    kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
    if kh != k or kw != k:
        top, left = (k - kh) // 2, (k - kw) // 2
        weight = weight[:, :, top : top + kh, left : left + kw]
    if kh == 1 and kw == 1:
        if stride != 1:
            x = x[:, :, ::stride, ::stride]
        return x * weight.reshape(1, -1, 1, 1)
    if x.device.type == "cpu" and _toeplitz_pays(h * w, max(kh, kw)):
        return _depthwise_toeplitz(x, weight, stride)
    return F.conv2d(x, weight, None, stride, (kh // 2, kw // 2), 1, x.shape[1])


def _toeplitz_pays(positions: int, kernel: int) -> bool:
    """Whether the per-channel matrix form beats oneDNN for a depthwise conv (fwd + bwd, CPU).

    oneDNN has no specialised depthwise weight-gradient kernel above 3x3 and falls back to a
    generic grouped one; on tiny maps even its 3x3 path is dominated by fixed costs. The dense
    ``HW x H'W'`` matrices, on the other hand, grow quadratically with the map. Thresholds from
    fwd+bwd timings at batch 64 on AVX-512 (1 thread): 2x2 maps any kernel (~3x faster), 4x4
    maps with 5x5 / 7x7 kernels (2-3x), 8x8 maps with 7x7 kernels (~1.4x).
    """
    return positions <= 4 or (positions <= 16 and kernel >= 5) or (positions <= 64 and kernel >= 7)


_TOEPLITZ_INDEX: dict[tuple, Tensor] = {}


def _toeplitz_index(h: int, w: int, kh: int, kw: int, stride: int, device: torch.device) -> Tensor:
    """For every (input position, output position) pair, the kernel tap that links them
    (``kh * kw`` meaning "none"), flattened; cached per geometry."""
    key = (h, w, kh, kw, stride, device)
    index = _TOEPLITZ_INDEX.get(key)
    if index is None:
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        rows = torch.arange(h).view(h, 1, 1, 1) - stride * torch.arange(ho).view(1, 1, ho, 1) + kh // 2
        cols = torch.arange(w).view(1, w, 1, 1) - stride * torch.arange(wo).view(1, 1, 1, wo) + kw // 2
        valid = (rows >= 0) & (rows < kh) & (cols >= 0) & (cols < kw)
        index = torch.where(valid, rows * kw + cols, kh * kw).reshape(-1).to(device)
        _TOEPLITZ_INDEX[key] = index
    return index


def _channel_major(t: Tensor) -> Tensor:
    """``(N, C, H, W)`` in any memory format -> contiguous ``(C, N, H*W)``."""
    n, c, h, w = t.shape
    return t.transpose(0, 1).reshape(c, n, h * w).contiguous()


def _from_channel_major(t: Tensor, shape: tuple[int, ...], channels_last: bool) -> Tensor:
    """Inverse of :func:`_channel_major`, NHWC or NCHW contiguous."""
    n, c, h, w = shape
    out = t.view(c, n, h, w).transpose(0, 1)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class _DepthwiseToeplitz(torch.autograd.Function):
    """Depthwise convolution as ``C`` matrix products with explicit, copy-once layouts.

    Written as a Function (rather than left to autograd) so that every batched matmul, forward
    and backward, sees contiguous operands: strided NHWC views would make ``bmm`` copy each of the
    ``C`` small matrices separately, and mixed layouts slow down the neighbouring ops.
    """

    @staticmethod
    # under bf16-mixed autocast the saved operands would come out in two dtypes; the matrices are
    # small, so this CPU path runs in float32 whatever autocast chose around it
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, weight: Tensor, index: Tensor, stride: int) -> Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        kh, kw = weight.shape[-2:]
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        taps = torch.cat([weight.reshape(c, kh * kw), weight.new_zeros(c, 1)], dim=1)
        toeplitz = taps.index_select(1, index)
        xc = _channel_major(x)
        y = torch.bmm(xc, toeplitz.view(c, h * w, ho * wo))
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(xc, toeplitz, index)
        ctx.shapes = (tuple(x.shape), tuple(weight.shape), channels_last)
        return _from_channel_major(y, (n, c, ho, wo), channels_last)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        xc, toeplitz, index = ctx.saved_tensors
        toeplitz = toeplitz.view(xc.shape[0], xc.shape[2], -1)
        x_shape, w_shape, channels_last = ctx.shapes
        gc = _channel_major(grad_out)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(gc, toeplitz.transpose(1, 2))
            grad_x = _from_channel_major(gx, x_shape, channels_last)
        if ctx.needs_input_grad[1]:
            c = xc.shape[0]
            kk = w_shape[-2] * w_shape[-1]
            g_toeplitz = torch.bmm(xc.transpose(1, 2), gc).view(c, -1)
            g_taps = g_toeplitz.new_zeros(c, kk + 1).index_add_(1, index, g_toeplitz)
            grad_w = g_taps[:, :kk].reshape(w_shape)
        return grad_x, grad_w, None, None


def _depthwise_toeplitz(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """Depthwise "same" convolution as ``C`` small matrix products ``x_c (N x HW) @ T_c``.

    ``T_c`` (``HW x H'W'``) holds channel ``c``'s taps at the positions they connect, so the
    weight gradient becomes one batched matrix product plus an index-add instead of oneDNN's
    slow generic kernel.
    """
    # the index is looked up out here: created inside the Function, the cached tensor would be
    # a side effect that torch.compile cannot trace
    index = _toeplitz_index(x.shape[2], x.shape[3], weight.shape[-2], weight.shape[-1], stride, x.device)
    return _DepthwiseToeplitz.apply(x, weight, index, stride)


class DynamicDepthwiseConv2d(QuantHookMixin, nn.Module):
    """Depthwise convolution with elastic channels and an elastic (transformed) kernel.

    Only the largest kernel is stored. The ``k``-kernel is obtained by cropping the centre of the
    next larger active kernel and mapping its ``k*k`` taps through the learned matrix
    ``transform_{K}to{k}`` (shared by all channels); the chain starts from the stored kernel.
    All matrices start as identities, so at initialisation a smaller kernel is exactly the centre
    crop of the largest one.
    """

    def __init__(self, max_channels: int, kernel_choices: list[int], stride: int = 1) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.kernel_choices = sorted(set(kernel_choices))
        self.max_kernel_size = self.kernel_choices[-1]
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(max_channels, 1, self.max_kernel_size, self.max_kernel_size))
        # transform_7to5, transform_5to3, ...: one per consecutive pair of kernel sizes
        for small, large in zip(self.kernel_choices[:-1], self.kernel_choices[1:]):
            self.register_parameter(
                self._transform_name(large, small), nn.Parameter(torch.eye(small * small))
            )
        self.active_kernel_size = self.max_kernel_size
        self._init_quant_hooks()
        self.reset_parameters()

    @staticmethod
    def _transform_name(large: int, small: int) -> str:
        return f"transform_{large}to{small}"

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        for small, large in zip(self.kernel_choices[:-1], self.kernel_choices[1:]):
            with torch.no_grad():
                getattr(self, self._transform_name(large, small)).copy_(torch.eye(small * small))

    def kernel_transforms(self) -> list[nn.Parameter]:
        """The transformation matrices (kept out of weight decay by the training code)."""
        return [
            getattr(self, self._transform_name(large, small))
            for small, large in zip(self.kernel_choices[:-1], self.kernel_choices[1:])
        ]

    def active_weight(self, channels: int, kernel_size: int | None = None) -> Tensor:
        """The ``(channels, 1, k, k)`` kernel of the active (or given) kernel size.

        Channels are sliced before the transformation so the (small) matrices only touch the
        taps that will run; the whole chain is computed once per call.
        """
        k = self.active_kernel_size if kernel_size is None else kernel_size
        if k not in self.kernel_choices:
            raise ValueError(f"kernel size {k} is not one of {self.kernel_choices}")
        weight = self.weight if channels == self.max_channels else self.weight[:channels]
        size = self.max_kernel_size
        for small in reversed(self.kernel_choices):
            if small >= size:
                continue
            if small < k:
                break
            start = (size - small) // 2
            taps = weight[:, :, start : start + small, start : start + small].reshape(channels, small * small)
            taps = F.linear(taps, getattr(self, self._transform_name(size, small)))
            weight = taps.view(channels, 1, small, small)
            size = small
        return weight

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        weight = self.active_weight(channels)
        x, weight = self._quantize(x, weight)
        return depthwise_conv2d(x, weight, self.stride)

    def extra_repr(self) -> str:
        return (
            f"{self.max_channels}, kernel_choices={self.kernel_choices}, stride={self.stride}, "
            f"active_kernel={self.active_kernel_size}"
        )


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the first ``x.shape[1]`` channels of its statistics and affine.

    A real ``BatchNorm2d`` subclass, so code that treats batch norms specially (weight-decay
    groups, recalibration, ``isinstance`` checks) keeps working. Slices of the running statistics
    are views, so training updates them in place. Do not convert a supernet with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``: the replacement would not be elastic.
    """

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        if channels == self.num_features:
            return super().forward(x)
        self._check_input_dim(x)
        # mirrors nn.BatchNorm2d.forward's momentum / cumulative-average bookkeeping
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # same rules as nn.BatchNorm2d: eval mode reads the running stats, training mode
        # updates them unless they are not tracked
        use_stats = not self.training or self.track_running_stats
        mean = self.running_mean[:channels] if use_stats and self.running_mean is not None else None
        var = self.running_var[:channels] if use_stats and self.running_var is not None else None
        return F.batch_norm(
            x,
            mean,
            var,
            self.weight[:channels] if self.weight is not None else None,
            self.bias[:channels] if self.bias is not None else None,
            self.training or self.running_mean is None,
            factor,
            self.eps,
        )


class DynamicLinear(QuantHookMixin, nn.Module):
    """Linear layer with elastic input features (from the input) and ``active_out_features``."""

    def __init__(self, max_in_features: int, max_out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.max_in_features = max_in_features
        self.max_out_features = max_out_features
        self.weight = nn.Parameter(torch.empty(max_out_features, max_in_features))
        self.bias = nn.Parameter(torch.empty(max_out_features)) if bias else None
        self.active_out_features = max_out_features
        self._init_quant_hooks()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.max_in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def active_weight(self, in_features: int) -> Tensor:
        out = self.active_out_features
        if out == self.max_out_features and in_features == self.max_in_features:
            return self.weight
        return self.weight[:out, :in_features]

    def active_bias(self) -> Tensor | None:
        if self.bias is None or self.active_out_features == self.max_out_features:
            return self.bias
        return self.bias[: self.active_out_features]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.active_weight(x.shape[-1])
        x, weight = self._quantize(x, weight)
        return F.linear(x, weight, self.active_bias())

    def extra_repr(self) -> str:
        return (
            f"{self.max_in_features}, {self.max_out_features}, bias={self.bias is not None}, "
            f"active_out={self.active_out_features}"
        )


class DynamicSqueezeExcite(nn.Module):
    """Squeeze-excite on the input's channels: pool, 1x1 reduce (ReLU), 1x1 expand (h-sigmoid).

    The hidden width follows the active channels (``make_divisible(channels // reduction)``), as
    in a standalone block of that width, so extraction gives an ordinary SE module.
    """

    def __init__(self, max_channels: int, reduction: int = 4, divisor: int = 8) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.reduction = reduction
        self.divisor = divisor
        hidden = self.hidden_channels(max_channels)
        self.reduce = DynamicConv2d(max_channels, hidden, 1, bias=True)
        self.expand = DynamicConv2d(hidden, max_channels, 1, bias=True)

    def hidden_channels(self, channels: int) -> int:
        return make_divisible(channels // self.reduction, self.divisor)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        self.reduce.active_out_channels = self.hidden_channels(channels)
        self.expand.active_out_channels = channels
        scale = x.mean((2, 3), keepdim=True)
        scale = F.relu(self.reduce(scale), inplace=True)
        scale = F.hardsigmoid(self.expand(scale), inplace=True)
        return x * scale


@torch.no_grad()
def copy_active_weights(target: nn.Module, source: nn.Module) -> None:
    """Fill the plain layers of ``target`` with the active weights of ``source``'s same-named layers.

    Subnet extraction: every ``nn.Conv2d`` / ``nn.Linear`` of ``target`` takes the active weight
    (sliced channels, transformed or cropped kernel) and bias of the dynamic layer of the same
    qualified name in ``source``, every ``nn.BatchNorm2d`` the first channels of the dynamic batch
    norm's affine parameters and running statistics. Values are copied: ``target`` shares no
    storage with ``source``.
    """
    sources = dict(source.named_modules())
    for name, module in target.named_modules():
        if isinstance(module, nn.Conv2d):
            layer = sources[name]
            module.weight.copy_(layer.active_weight(module.in_channels))
            if module.bias is not None:
                module.bias.copy_(layer.active_bias())
        elif isinstance(module, nn.Linear):
            layer = sources[name]
            module.weight.copy_(layer.active_weight(module.in_features))
            module.bias.copy_(layer.active_bias())
        elif isinstance(module, nn.BatchNorm2d):
            _copy_batchnorm(sources[name], module)


def _copy_batchnorm(source: nn.BatchNorm2d, target: nn.BatchNorm2d) -> None:
    c = target.num_features
    target.eps = source.eps
    target.momentum = source.momentum
    if target.affine:
        target.weight.copy_(source.weight[:c])
        target.bias.copy_(source.bias[:c])
    if target.track_running_stats and source.running_mean is not None:
        target.running_mean.copy_(source.running_mean[:c])
        target.running_var.copy_(source.running_var[:c])
        target.num_batches_tracked.copy_(source.num_batches_tracked)
