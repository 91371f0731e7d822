"""The once-for-all elastic MobileNetV3 supernet (pure PyTorch).

:class:`OFAMobileNetV3` holds the weights of the largest network of an
:class:`~lightning_nas.spaces.ofa_mbv3.OFAMobileNetV3Space` and runs whichever subnet
:meth:`~OFAMobileNetV3.set_active` selected; the input resolution is whatever the batch has.
:meth:`~OFAMobileNetV3.extract` copies a subnet into a standalone
:class:`~lightning_nas.nn.static.MobileNetV3Subnet` made of standard layers. Module names follow
the space's naming contract, so per-layer tools can address the same layer in both networks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nas.nn.elastic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicLinear,
    DynamicSqueezeExcite,
    copy_active_weights,
)
from lightning_nas.nn.static import Classifier, Head, MobileNetV3Subnet, make_activation
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

__all__ = ["DynamicConvBN", "DynamicMBConv", "OFAMobileNetV3"]


class DynamicConvBN(nn.Module):
    """A dynamic convolution, an optional dynamic batch norm and an optional activation."""

    def __init__(self, conv: nn.Module, bn: DynamicBatchNorm2d | None, activation: str | None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class DynamicMBConv(nn.Module):
    """Inverted residual block with elastic depthwise kernel and elastic hidden width.

    ``expand`` (1x1, BN, act) -> ``dw`` (kxk depthwise, BN, act) -> [``se``] -> ``project``
    (1x1, BN); identity shortcut when the shape is preserved. Without ``expand`` the hidden width
    is the input width (the fixed first block).
    """

    def __init__(
        self,
        in_channels: int,
        max_mid_channels: int,
        out_channels: int,
        kernel_choices: list[int],
        stride: int,
        activation: str,
        use_se: bool,
        se_reduction: int = 4,
        expand: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()

        def bn(channels: int) -> DynamicBatchNorm2d:
            return DynamicBatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)

        self.in_channels = in_channels
        self.max_mid_channels = max_mid_channels if expand else in_channels
        self.out_channels = out_channels
        mid = self.max_mid_channels
        self.expand = (
            DynamicConvBN(DynamicConv2d(in_channels, mid, 1), bn(mid), activation) if expand else None
        )
        self.dw = DynamicConvBN(DynamicDepthwiseConv2d(mid, kernel_choices, stride), bn(mid), activation)
        self.se = DynamicSqueezeExcite(mid, se_reduction) if use_se else None
        self.project = DynamicConvBN(DynamicConv2d(mid, out_channels, 1), bn(out_channels), None)
        self.residual = stride == 1 and in_channels == out_channels

    def set_active(self, kernel_size: int, mid_channels: int) -> None:
        """Select the depthwise kernel size and the hidden width (ignored without ``expand``)."""
        if self.expand is not None:
            self.expand.conv.active_out_channels = mid_channels
        else:
            mid_channels = self.max_mid_channels
        self.dw.conv.active_kernel_size = kernel_size
        if self.se is not None:
            # the SE derives its widths from its input at run time; set them here too so that
            # extraction and introspection see the active shapes without a forward pass
            self.se.reduce.active_out_channels = self.se.hidden_channels(mid_channels)
            self.se.expand.active_out_channels = mid_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y

    def reorder_channels(
        self, bands: Sequence[int] = (), se_bands: Sequence[int] = (), optimizer=None
    ) -> None:
        """Permute the hidden channels by decreasing importance (see ``OFAMobileNetV3.reorder_channels``)."""
        if self.expand is None:
            return
        importance = self.project.conv.weight.detach().abs().sum(dim=(0, 2, 3))
        order = _banded_descending_order(importance, bands)
        _permute(self.expand.conv.weight, 0, order, optimizer)
        _permute_bn(self.expand.bn, order, optimizer)
        _permute(self.dw.conv.weight, 0, order, optimizer)
        _permute_bn(self.dw.bn, order, optimizer)
        _permute(self.project.conv.weight, 1, order, optimizer)
        if self.se is not None:
            _permute(self.se.reduce.weight, 1, order, optimizer)
            _permute(self.se.expand.weight, 0, order, optimizer)
            _permute(self.se.expand.bias, 0, order, optimizer)
            # the SE hidden units shrink with the block too: keep the strongest ones first
            se_importance = self.se.expand.weight.detach().abs().sum(dim=(0, 2, 3))
            se_order = _banded_descending_order(se_importance, se_bands)
            _permute(self.se.reduce.weight, 0, se_order, optimizer)
            _permute(self.se.reduce.bias, 0, se_order, optimizer)
            _permute(self.se.expand.weight, 1, se_order, optimizer)


class OFAMobileNetV3(nn.Module):
    """Elastic MobileNetV3 supernet of an :class:`OFAMobileNetV3Space`.

    The active subnet (initially the largest) is chosen with :meth:`set_active`; ``forward`` runs
    it on inputs of any resolution. Submodule names follow the space's naming contract:
    ``stem``, ``first_block``, ``blocks.{b}`` (``expand``/``dw``/``se``/``project``), ``head``
    (``final_expand``, ``feature_mix``) and ``classifier.linear``.
    """

    def __init__(self, space: OFAMobileNetV3Space) -> None:
        super().__init__()
        self.space = space
        bn = {"bn_momentum": space.bn_momentum, "bn_eps": space.bn_eps}

        def dyn_bn(channels: int) -> DynamicBatchNorm2d:
            return DynamicBatchNorm2d(channels, eps=space.bn_eps, momentum=space.bn_momentum)

        self.stem = DynamicConvBN(
            DynamicConv2d(3, space.stem_channels, 3, space.stem_stride),
            dyn_bn(space.stem_channels),
            "h_swish",
        )
        self.first_block = DynamicMBConv(
            space.stem_channels,
            space.stem_channels,
            space.first_block_channels,
            kernel_choices=[3],
            stride=1,
            activation="relu",
            use_se=False,
            expand=False,
            **bn,
        )
        self.blocks = nn.ModuleList(
            DynamicMBConv(
                spec.in_channels,
                space.max_mid_channels(spec.index),
                spec.out_channels,
                kernel_choices=space.kernel_choices,
                stride=spec.stride,
                activation=spec.activation,
                use_se=spec.use_se,
                se_reduction=space.se_reduction,
                **bn,
            )
            for spec in space.blocks
        )
        self.head = Head(
            DynamicConvBN(
                DynamicConv2d(space.widths[-1], space.head_channels, 1),
                dyn_bn(space.head_channels),
                "h_swish",
            ),
            DynamicConvBN(DynamicConv2d(space.head_channels, space.feature_channels, 1), None, "h_swish"),
        )
        self.classifier = Classifier(DynamicLinear(space.feature_channels, space.num_classes), space.dropout)
        self._active_config: dict = {}
        self._running: list[DynamicMBConv] = []
        self.set_max()

    # ------------------------------------------------------------------ subnet selection

    def set_active(self, config: Mapping[str, Any]) -> None:
        """Make ``config`` (validated against the space) the subnet that ``forward`` runs.

        The resolution ``r`` is recorded but not applied: the network runs at the batch's size.
        """
        config = self.space.canonical(config)
        for b, block in enumerate(self.blocks):
            block.set_active(config["ks"][b], self.space.mid_channels(b, config["e"][b]))
        self._running = [self.blocks[b] for b in self.space.active_blocks(config)]
        self._active_config = config

    def set_max(self) -> None:
        """Select the largest subnet."""
        self.set_active(self.space.largest())

    @property
    def active_config(self) -> dict:
        """A copy of the canonical config of the active subnet."""
        c = self._active_config
        return {"ks": list(c["ks"]), "e": list(c["e"]), "d": list(c["d"]), "r": c["r"]}

    def sample_active(self, rng: random.Random) -> dict:
        """Select a uniformly random subnet drawn from ``rng`` and return its config."""
        config = self.space.sample(rng)
        self.set_active(config)
        return config

    def forward(self, x: Tensor) -> Tensor:
        x = self.first_block(self.stem(x))
        for block in self._running:
            x = block(x)
        return self.classifier(self.head(x))

    # ------------------------------------------------------------------ extraction

    @torch.no_grad()
    def extract(self, config: Mapping[str, Any] | None = None) -> MobileNetV3Subnet:
        """A standalone :class:`MobileNetV3Subnet` of ``config`` (default: the active one).

        Weights are copied (sliced channels, transformed small kernels, sliced batch-norm
        statistics), so the result shares no storage with the supernet; it comes back on the
        supernet's device and dtype, in the supernet's train / eval mode. The supernet's active
        subnet is left unchanged.
        """
        previous = self._active_config
        config = self.space.canonical(self._active_config if config is None else config)
        self.set_active(config)
        try:
            ref = next(self.parameters())
            subnet = MobileNetV3Subnet(self.space, config).to(device=ref.device, dtype=ref.dtype)
            copy_active_weights(subnet, self)
        finally:
            self.set_active(previous)
        return subnet.train(self.training)

    # ------------------------------------------------------------------ training helpers

    @torch.no_grad()
    def reorder_channels(self, keep_expand_ratios: Iterable[int] = (), optimizer=None) -> None:
        """Sort every elastic block's hidden channels by decreasing importance.

        Importance of a hidden channel is the L1 norm of the project (1x1) weights that read it:
        the channel's total contribution to the block output. After the permutation, running a
        smaller expand ratio keeps the most important channels. The expand conv, both batch norms,
        the depthwise kernels, the squeeze-excite (whose own hidden units are sorted by the L1 norm
        of their expand weights) and the project conv are permuted consistently, so the full
        network computes exactly the same function.

        Args:
            keep_expand_ratios: ratios whose channel sets must not change (e.g. ``[4]`` when
                moving from expand {4, 6} to {3, 4, 6}): channels are only sorted within the bands
                those widths delimit, as in the later expand phase of progressive shrinking.
            optimizer: if given, its per-parameter state tensors (momentum buffers, Adam moments)
                are permuted along with the parameters so training can continue seamlessly.
        """
        ratios = sorted(set(keep_expand_ratios))
        for b, block in enumerate(self.blocks):
            bands = [self.space.mid_channels(b, e) for e in ratios]
            se_bands = [self.space.se_channels(m) for m in bands]
            block.reorder_channels(bands, se_bands, optimizer)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: weight decay on conv / linear weights only.

        Batch-norm parameters, biases and kernel transformation matrices get no weight decay (the
        transforms start at identity and decay would pull them towards zero).
        """
        no_decay = {
            id(p) for m in self.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(False)
        }
        for m in self.modules():
            if isinstance(m, DynamicDepthwiseConv2d):
                no_decay.update(id(p) for p in m.kernel_transforms())
            bias = getattr(m, "bias", None)
            if isinstance(bias, nn.Parameter):
                no_decay.add(id(bias))
        decay = [p for p in self.parameters() if id(p) not in no_decay]
        rest = [p for p in self.parameters() if id(p) in no_decay]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _banded_descending_order(importance: Tensor, bands: Sequence[int]) -> Tensor:
    """Indices sorting ``importance`` descending within the bands split at ``bands``."""
    edges = sorted({b for b in bands if 0 < b < importance.numel()})
    pieces = []
    for start, stop in zip([0, *edges], [*edges, importance.numel()]):
        local = torch.sort(importance[start:stop], descending=True, stable=True).indices
        pieces.append(local + start)
    return torch.cat(pieces)


def _permute(tensor: Tensor, dim: int, order: Tensor, optimizer=None) -> None:
    # copy_ keeps the tensor object: optimizers, DDP buckets and hooks hold references to it
    tensor.copy_(tensor.index_select(dim, order))
    if optimizer is not None and isinstance(tensor, nn.Parameter):
        for value in optimizer.state.get(tensor, {}).values():
            if isinstance(value, Tensor) and value.shape == tensor.shape:
                value.copy_(value.index_select(dim, order))


def _permute_bn(bn: nn.BatchNorm2d, order: Tensor, optimizer=None) -> None:
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        if tensor is not None:
            _permute(tensor, 0, order, optimizer)
