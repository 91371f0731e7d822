"""Elastic blocks and stages of the SpaceEvo block types, and their plain extractions.

The structure of every block type (layers, names, hidden widths, shortcuts) is fixed by
:func:`lightning_nas.spaces.spaceevo_layout.block_layers`; the modules here build exactly those
layers, so the layout's MAC counts describe these networks. :class:`ElasticBlock` holds the weights
of a block's largest configuration and runs prefix slices of them; :class:`ElasticStage` stacks the
blocks of one (stage, block type) cell:

* **width**: the stage's output channels (any width of the stage's list), sliced from the largest
  width's weights; input channels follow the input tensor.
* **kernel**: depthwise convs are :class:`~lightning_nas.nn.elastic.DynamicDepthwiseConv2d` (the
  once-for-all kernel transform: the centre of the next larger kernel through a learned matrix,
  the identity at initialisation); dense kxk convs (bottleneck, fused MBConv) take the plain
  centre crop of the largest kernel (:class:`DynamicKernelConv2d`).
* **expand**: the hidden width ``mid_channels(type, in, out, expand)``, a prefix of the largest.
* **depth**: a stage runs its first ``depth`` blocks (one kernel and expand ratio for all of them,
  as a :class:`~lightning_nas.spaces.spaceevo_layout.SubStage` says).

Shortcuts follow the active shapes: the identity when a block keeps stride 1 and its width, else
the bottleneck's 1x1 projection (the first block of an elastic bottleneck stage keeps those weights
and uses them only when its active shapes change) and no shortcut for the other families.

``extract`` copies the active configuration into modules of standard layers with the same names:
:class:`~lightning_nas.nn.static.MBConv` for the MBConv families and :class:`PlainBlock` for the
others, wrapped in a :class:`PlainStage`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nas.nn.elastic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicSqueezeExcite,
    copy_active_weights,
)
from lightning_nas.nn.ofa_mbv3 import DynamicConvBN
from lightning_nas.nn.static import ConvBNAct, MBConv, SqueezeExcite, make_activation
from lightning_nas.spaces.spaceevo_layout import (
    BLOCK_TYPES,
    SE_REDUCTION,
    SubStage,
    mid_channels,
    se_channels,
)

__all__ = [
    "DynamicKernelConv2d",
    "ElasticBlock",
    "ElasticStage",
    "PlainBlock",
    "PlainStage",
    "block_family",
    "plain_block",
]

#: How each block type is wired (the branches of ``spaceevo_layout.block_layers``), and the main
#: path of each family in execution order; squeeze-excite, where the type has it, runs before the
#: last layer.
_FAMILIES = {
    "dual_dw": "dual_dw",
    "mbconv": "inverted",
    "mbconv_se": "inverted",
    "bottleneck": "bottleneck",
    "fused_mbconv": "fused",
    "fused_mbconv_se": "fused",
}
_MAIN_PATH = {
    "dual_dw": ("dw1", "pw1", "dw2", "pw2"),
    "inverted": ("expand", "dw", "project"),
    "bottleneck": ("reduce", "conv", "expand"),
    "fused": ("fused", "project"),
}


def block_family(block_type: str) -> str:
    """``dual_dw``, ``inverted``, ``bottleneck`` or ``fused``; ``ValueError`` for an unknown type."""
    try:
        return _FAMILIES[block_type]
    except KeyError:
        raise ValueError(f"unknown block type {block_type!r}; known: {sorted(_FAMILIES)}") from None


def _layer_names(family: str, use_se: bool) -> tuple[str, ...]:
    path = _MAIN_PATH[family]
    return (*path[:-1], "se", path[-1]) if use_se else path


class DynamicKernelConv2d(DynamicConv2d):
    """Dense convolution with elastic channels and an elastic kernel: the centre crop of the largest.

    A learned kernel transform (as the depthwise convs have) would be one matrix shared by all
    ``in x out`` filters; the reference trains the plain crop for its dense convs too.
    """

    def __init__(self, max_in_channels: int, max_out_channels: int, kernel_choices: tuple[int, ...] | list[int],
                 stride: int = 1) -> None:
        choices = sorted({int(k) for k in kernel_choices})
        if not choices or any(k < 1 or k % 2 == 0 for k in choices):
            raise ValueError(f"kernel choices must be odd positive sizes, got {list(kernel_choices)}")
        super().__init__(max_in_channels, max_out_channels, choices[-1], stride)
        self.kernel_choices = choices
        self.active_kernel_size = choices[-1]

    def active_weight(self, in_channels: int) -> Tensor:
        weight = super().active_weight(in_channels)
        k = self.active_kernel_size
        if k != self.kernel_size:
            start = (self.kernel_size - k) // 2
            weight = weight[:, :, start : start + k, start : start + k]
        return weight

    def forward(self, x: Tensor) -> Tensor:
        weight = self.active_weight(x.shape[1])
        x, weight = self._quantize(x, weight)
        return F.conv2d(x, weight, self.active_bias(), self.stride, self.active_kernel_size // 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_choices={self.kernel_choices}, active_kernel={self.active_kernel_size}"


class _BlockForward(nn.Module):
    """The forward pass of elastic and plain non-MBConv blocks (same submodule names and wiring)."""

    layer_names: tuple[str, ...]
    #: Identity shortcut (stride 1, same widths); a plain attribute, not a shape test, so the plain
    #: blocks trace with torch.fx (int8 conversion) and export to ONNX.
    residual: bool
    shortcut: nn.Module | None
    post_act: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for name in self.layer_names:
            y = getattr(self, name)(y)
        if self.residual:
            y = y + x
        elif self.shortcut is not None:
            y = y + self.shortcut(x)
        return y if self.post_act is None else self.post_act(y)


class ElasticBlock(_BlockForward):
    """One elastic block of a SpaceEvo block type.

    Args:
        block_type: a name of :data:`~lightning_nas.spaces.spaceevo_layout.BLOCK_TYPES` (its kernel
            and expand choices, squeeze-excite and activation are used).
        max_in_channels / max_out_channels: the largest input and output widths.
        stride: stride of the block's kxk conv (and of the bottleneck's projection shortcut).
        projection: whether a bottleneck keeps projection-shortcut weights (``None``: when the
            largest shapes change; the first block of an elastic stage always does, since its
            active input and output widths may differ). Other families ignore it.
        bn_momentum / bn_eps: batch-norm settings.
    """

    def __init__(
        self,
        block_type: str,
        max_in_channels: int,
        max_out_channels: int,
        stride: int,
        projection: bool | None = None,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        family = block_family(block_type)
        spec = BLOCK_TYPES[block_type]
        self.block_type = block_type
        self.family = family
        self.max_in_channels = max_in_channels
        self.max_out_channels = max_out_channels
        self.kernel_choices = sorted(spec.kernels)
        self.expand_choices = sorted(spec.expands)
        self.stride = stride
        self.activation = spec.activation
        self.use_se = spec.se
        self.bn_momentum = bn_momentum
        self.bn_eps = bn_eps
        self.layer_names = _layer_names(family, spec.se)

        def unit(conv: nn.Module, channels: int, act: str | None = spec.activation) -> DynamicConvBN:
            return DynamicConvBN(conv, DynamicBatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum), act)

        cin, cout, ks = max_in_channels, max_out_channels, self.kernel_choices
        mid = mid_channels(block_type, cin, cout, max(self.expand_choices))
        if family == "dual_dw":
            self.dw1 = unit(DynamicDepthwiseConv2d(cin, ks, stride), cin)
            self.pw1 = unit(DynamicConv2d(cin, cout), cout)
            self.dw2 = unit(DynamicDepthwiseConv2d(cout, ks, 1), cout)
            self.pw2 = unit(DynamicConv2d(cout, cout), cout, None)
        elif family == "inverted":
            self.expand = unit(DynamicConv2d(cin, mid), mid)
            self.dw = unit(DynamicDepthwiseConv2d(mid, ks, stride), mid)
            self.project = unit(DynamicConv2d(mid, cout), cout, None)
        elif family == "bottleneck":
            self.reduce = unit(DynamicConv2d(cin, mid), mid)
            self.conv = unit(DynamicKernelConv2d(mid, mid, ks, stride), mid)
            self.expand = unit(DynamicConv2d(mid, cout), cout, None)
        else:
            self.fused = unit(DynamicKernelConv2d(cin, mid, ks, stride), mid)
            self.project = unit(DynamicConv2d(mid, cout), cout, None)
        self.se = DynamicSqueezeExcite(mid, SE_REDUCTION) if spec.se else None
        if projection is None:
            projection = stride != 1 or cin != cout
        # only a bottleneck projects its shortcut; the others drop it when the shapes change
        projection = projection and family == "bottleneck"
        self.shortcut = unit(DynamicConv2d(cin, cout, 1, stride), cout, None) if projection else None
        self.post_act = make_activation(spec.activation) if family == "bottleneck" else None
        self.set_active(cin, cout, ks[-1], self.expand_choices[-1])

    def set_active(self, in_channels: int, out_channels: int, kernel_size: int, expand: float) -> None:
        """Select the widths, kernel and expand ratio that ``forward`` and :meth:`extract` use."""
        if not 0 < in_channels <= self.max_in_channels:
            raise ValueError(f"input width {in_channels} is not in [1, {self.max_in_channels}]")
        if not 0 < out_channels <= self.max_out_channels:
            raise ValueError(f"output width {out_channels} is not in [1, {self.max_out_channels}]")
        if kernel_size not in self.kernel_choices:
            raise ValueError(f"kernel size {kernel_size} is not one of {self.kernel_choices}")
        if expand not in self.expand_choices:
            raise ValueError(f"expand ratio {expand} is not one of {self.expand_choices}")
        if (self.family == "bottleneck" and self.shortcut is None
                and not (self.stride == 1 and in_channels == out_channels)):
            raise ValueError(f"this bottleneck has no projection shortcut for {in_channels} -> {out_channels}")
        mid = mid_channels(self.block_type, in_channels, out_channels, expand)
        for module in self.modules():
            if isinstance(module, (DynamicDepthwiseConv2d, DynamicKernelConv2d)):
                module.active_kernel_size = kernel_size
        if self.family == "dual_dw":
            self.pw1.conv.active_out_channels = out_channels
            self.pw2.conv.active_out_channels = out_channels
        else:
            # the first layer makes the hidden width (depthwise convs follow their input)
            getattr(self, self.layer_names[0]).conv.active_out_channels = mid
            if self.family == "bottleneck":
                self.conv.conv.active_out_channels = mid
            getattr(self, self.layer_names[-1]).conv.active_out_channels = out_channels
        if self.se is not None:
            # the SE sizes itself from its input at run time; set it here too for extraction
            self.se.reduce.active_out_channels = self.se.hidden_channels(mid)
            self.se.expand.active_out_channels = mid
        if self.shortcut is not None:
            self.shortcut.conv.active_out_channels = out_channels
        self.residual = self.stride == 1 and in_channels == out_channels
        self.active_in_channels = in_channels
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size
        self.active_expand = expand

    @torch.no_grad()
    def extract(self) -> nn.Module:
        """A standalone block of standard layers for the active configuration (copied weights,
        the block's device, dtype and train / eval mode)."""
        ref = next(self.parameters())
        plain = plain_block(self.block_type, self.active_in_channels, self.active_out_channels, self.stride,
                            self.active_kernel_size, self.active_expand, self.bn_momentum, self.bn_eps)
        plain = plain.to(device=ref.device, dtype=ref.dtype)
        copy_active_weights(plain, self)
        return plain.train(self.training)


class PlainBlock(_BlockForward):
    """A dual depthwise, bottleneck or fused MBConv block of standard layers (names and wiring of
    :class:`ElasticBlock`); MBConv blocks are :class:`~lightning_nas.nn.static.MBConv`."""

    def __init__(
        self,
        block_type: str,
        in_channels: int,
        out_channels: int,
        stride: int,
        kernel_size: int,
        expand: float,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        family = block_family(block_type)
        if family == "inverted":
            raise ValueError("MBConv blocks are lightning_nas.nn.static.MBConv (see plain_block)")
        spec = BLOCK_TYPES[block_type]
        self.block_type = block_type
        self.stride = stride
        self.residual = stride == 1 and in_channels == out_channels
        self.layer_names = _layer_names(family, spec.se)
        k, cin, cout = kernel_size, in_channels, out_channels
        mid = mid_channels(block_type, cin, cout, expand)

        def unit(ci: int, co: int, kernel: int = 1, s: int = 1, groups: int = 1,
                 act: str | None = spec.activation) -> ConvBNAct:
            return ConvBNAct(ci, co, kernel, s, groups, activation=act, bn_momentum=bn_momentum, bn_eps=bn_eps)

        if family == "dual_dw":
            self.dw1 = unit(cin, cin, k, stride, cin)
            self.pw1 = unit(cin, cout)
            self.dw2 = unit(cout, cout, k, 1, cout)
            self.pw2 = unit(cout, cout, act=None)
        elif family == "bottleneck":
            self.reduce = unit(cin, mid)
            self.conv = unit(mid, mid, k, stride)
            self.expand = unit(mid, cout, act=None)
        else:
            self.fused = unit(cin, mid, k, stride)
            self.project = unit(mid, cout, act=None)
        self.se = SqueezeExcite(mid, se_channels(mid)) if spec.se else None
        projection = family == "bottleneck" and (stride != 1 or cin != cout)
        self.shortcut = unit(cin, cout, 1, stride, act=None) if projection else None
        self.post_act = make_activation(spec.activation) if family == "bottleneck" else None


def plain_block(
    block_type: str,
    in_channels: int,
    out_channels: int,
    stride: int,
    kernel_size: int,
    expand: float,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
) -> nn.Module:
    """A freshly initialised block of standard layers (the layers of ``spaceevo_layout.block_layers``)."""
    if block_family(block_type) == "inverted":
        spec = BLOCK_TYPES[block_type]
        mid = mid_channels(block_type, in_channels, out_channels, expand)
        return MBConv(in_channels, mid, out_channels, kernel_size, stride, spec.activation,
                      se_hidden=se_channels(mid) if spec.se else None, bn_momentum=bn_momentum, bn_eps=bn_eps)
    return PlainBlock(block_type, in_channels, out_channels, stride, kernel_size, expand, bn_momentum, bn_eps)


class ElasticStage(nn.Module):
    """The elastic stage of one (stage, block type) cell: ``max(depths)`` blocks of ``block_type``.

    Block 0 maps the stage input (at most ``max_in_channels``) to the stage width with the stage's
    stride; the other blocks keep the width at stride 1. :meth:`set_active` selects a
    :class:`~lightning_nas.spaces.spaceevo_layout.SubStage` and the input width; ``forward`` runs
    the sub-stage's blocks and :meth:`extract` copies them into a :class:`PlainStage`.
    """

    def __init__(
        self,
        block_type: str,
        max_in_channels: int,
        widths: tuple[int, ...] | list[int],
        stride: int,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        block_family(block_type)
        spec = BLOCK_TYPES[block_type]
        self.block_type = block_type
        self.max_in_channels = max_in_channels
        self.widths = sorted({int(w) for w in widths})
        if not self.widths or self.widths[0] < 1:
            raise ValueError(f"a stage needs positive widths, got {list(widths)}")
        self.depths = sorted(spec.depths)
        self.kernels = sorted(spec.kernels)
        self.expands = sorted(spec.expands)
        self.stride = stride
        self.max_width = self.widths[-1]
        self.blocks = nn.ModuleList(
            ElasticBlock(block_type, max_in_channels if i == 0 else self.max_width, self.max_width,
                         stride if i == 0 else 1, projection=i == 0, bn_momentum=bn_momentum, bn_eps=bn_eps)
            for i in range(self.depths[-1])
        )
        self.set_active(self.largest(), max_in_channels)

    def largest(self) -> SubStage:
        return SubStage(self.max_width, self.depths[-1], self.kernels[-1], self.expands[-1])

    def smallest(self) -> SubStage:
        return SubStage(self.widths[0], self.depths[0], self.kernels[0], self.expands[0])

    def set_active(self, substage: SubStage, in_channels: int) -> None:
        """Run ``substage`` on inputs of ``in_channels`` channels."""
        if substage.width not in self.widths:
            raise ValueError(f"width {substage.width} is not one of the stage's widths {self.widths}")
        if substage.depth not in self.depths:
            raise ValueError(f"depth {substage.depth} is not one of {self.depths}")
        for i in range(substage.depth):
            self.blocks[i].set_active(in_channels if i == 0 else substage.width, substage.width, substage.kernel,
                                      substage.expand)
        self.active_substage = substage
        self.active_in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.active_in_channels:
            raise ValueError(f"stage input has {x.shape[1]} channels; the active sub-stage was set for "
                             f"{self.active_in_channels}")
        for block in self.blocks[: self.active_substage.depth]:
            x = block(x)
        return x

    @torch.no_grad()
    def extract(self) -> PlainStage:
        """A standalone :class:`PlainStage` of the active sub-stage (copied weights)."""
        stage = PlainStage([block.extract() for block in self.blocks[: self.active_substage.depth]])
        return stage.train(self.training)


class PlainStage(nn.Module):
    """Blocks of standard layers run in order (``blocks.{i}``, as in :class:`ElasticStage`)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x
