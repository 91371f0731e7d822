"""Plain-PyTorch layers of extracted (standalone) MobileNetV3 subnets.

Everything here is made of ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``, ``nn.ReLU``,
``nn.Hardswish`` and friends, so extracted subnets work with any tool that understands standard
modules (FX quantization, ONNX export, torch.compile, per-layer quantizer wrapping). Module names
follow the naming contract of :mod:`lightning_nas.spaces.ofa_mbv3`, identical to the supernet's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

__all__ = [
    "Classifier",
    "ConvBNAct",
    "Head",
    "MBConv",
    "MobileNetV3Subnet",
    "SqueezeExcite",
    "init_mobilenet",
    "make_activation",
]


def init_mobilenet(net: nn.Module) -> None:
    """MobileNet initialisation: He (fan-out) convs, unit BN, small uniform classifier."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features**0.5
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def make_activation(name: str | None) -> nn.Module | None:
    """``"relu"`` -> ``nn.ReLU``, ``"relu6"`` -> ``nn.ReLU6``, ``"h_swish"`` -> ``nn.Hardswish``,
    ``None`` -> no activation."""
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "h_swish":
        return nn.Hardswish()
    raise ValueError(f"unknown activation {name!r}; expected 'relu', 'relu6' or 'h_swish'")


class ConvBNAct(nn.Module):
    """Convolution, optional batch norm, optional activation (submodules ``conv``, ``bn``, ``act``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = None,
        use_bn: bool = True,
        bias: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum) if use_bn else None
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class SqueezeExcite(nn.Module):
    """Squeeze-excite: global pool, 1x1 ``reduce`` + ReLU, 1x1 ``expand`` + hard sigmoid, rescale."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.gate(self.expand(self.relu(self.reduce(scale))))
        return x * scale


class MBConv(nn.Module):
    """Inverted residual block: [1x1 ``expand``] -> kxk depthwise ``dw`` -> [``se``] -> 1x1 ``project``.

    ``expand`` is omitted when ``mid_channels == in_channels`` is requested with ``expand=False``
    (the fixed first block); the identity shortcut is used when the shape is preserved.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        activation: str,
        se_hidden: int | None = None,
        expand: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not expand and mid_channels != in_channels:
            raise ValueError(
                f"a block without expand layer needs mid == in channels, got {mid_channels} != {in_channels}"
            )
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        self.expand = ConvBNAct(in_channels, mid_channels, 1, activation=activation, **bn) if expand else None
        self.dw = ConvBNAct(
            mid_channels, mid_channels, kernel_size, stride, groups=mid_channels, activation=activation, **bn
        )
        self.se = SqueezeExcite(mid_channels, se_hidden) if se_hidden else None
        self.project = ConvBNAct(mid_channels, out_channels, 1, **bn)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class Head(nn.Module):
    """1x1 ``final_expand`` (BN, h-swish), global average pool, 1x1 ``feature_mix`` (h-swish), flatten."""

    def __init__(self, final_expand: nn.Module, feature_mix: nn.Module) -> None:
        super().__init__()
        self.final_expand = final_expand
        self.feature_mix = feature_mix

    def forward(self, x: Tensor) -> Tensor:
        x = self.final_expand(x)
        x = x.mean((2, 3), keepdim=True)
        x = self.feature_mix(x)
        return torch.flatten(x, 1)


class Classifier(nn.Module):
    """Dropout followed by the ``linear`` layer."""

    def __init__(self, linear: nn.Module, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.linear(x)


class MobileNetV3Subnet(nn.Module):
    """A standalone OFA MobileNetV3 subnet made only of standard layers.

    Built from a space and a config (random init); :meth:`OFAMobileNetV3.extract` fills it with
    supernet weights. Elastic blocks live in ``blocks`` (an ``nn.ModuleDict``) under their supernet
    block index, so module names match the supernet's. ``config`` and ``space`` are kept as plain
    attributes: ``torch.save(subnet)`` stores them with the weights, and
    :func:`~lightning_nas.nn.builders.build_subnet` ``(space, subnet.config)`` rebuilds the architecture for a ``state_dict``.
    """

    def __init__(self, space: OFAMobileNetV3Space, config: Mapping[str, Any]) -> None:
        super().__init__()
        config = space.canonical(config)
        self.space = space
        self.config = config
        bn = {"bn_momentum": space.bn_momentum, "bn_eps": space.bn_eps}
        self.stem = ConvBNAct(3, space.stem_channels, 3, space.stem_stride, activation="h_swish", **bn)
        self.first_block = MBConv(
            space.stem_channels,
            space.stem_channels,
            space.first_block_channels,
            kernel_size=3,
            stride=1,
            activation="relu",
            expand=False,
            **bn,
        )
        blocks = {}
        for b in space.active_blocks(config):
            spec = space.blocks[b]
            mid = space.mid_channels(b, config["e"][b])
            blocks[str(b)] = MBConv(
                spec.in_channels,
                mid,
                spec.out_channels,
                kernel_size=config["ks"][b],
                stride=spec.stride,
                activation=spec.activation,
                se_hidden=space.se_channels(mid) if spec.use_se else None,
                **bn,
            )
        self.blocks = nn.ModuleDict(blocks)
        last = space.widths[-1]
        self.head = Head(
            ConvBNAct(last, space.head_channels, 1, activation="h_swish", **bn),
            ConvBNAct(space.head_channels, space.feature_channels, 1, activation="h_swish", use_bn=False),
        )
        self.classifier = Classifier(nn.Linear(space.feature_channels, space.num_classes), space.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MobileNet initialisation (:func:`init_mobilenet`)."""
        init_mobilenet(self)

    def block_layers(self) -> list[str]:
        """Qualified names of the convolutions inside the inverted residual blocks (the fixed first
        block included), in forward order: each block's expand, depthwise, squeeze-excite
        ``reduce`` / ``expand`` and project convolutions. These are the layers a mixed-precision
        policy chooses weight bits for; stem, head (``final_expand``, ``feature_mix``) and classifier
        stay at fixed bits, as MQ-Bench keeps ResNet-18's stem and classifier.

        The squeeze-excite convolutions are included: they cost almost no MACs (they run on pooled
        1 x 1 maps) but hold a large share of the weights (39 % of the CIFAR-10 layout's largest
        subnet), so leaving them at fixed bits would put that share outside every size budget.
        """
        return [name for name, m in self.named_modules()
                if isinstance(m, nn.Conv2d) and name.startswith(("first_block.", "blocks."))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.first_block(self.stem(x))
        for block in self.blocks.values():
            x = block(x)
        return self.classifier(self.head(x))
