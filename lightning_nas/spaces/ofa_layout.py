"""Layout pieces of the once-for-all MobileNetV3 space: channel rounding and the block table.

Kept apart from :mod:`lightning_nas.spaces.ofa_mbv3` because the network code
(:mod:`lightning_nas.nn.elastic`) and the ProxylessNAS space round channels with the same rule.
Torch-free.
"""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "BlockSpec", "conv_out", "make_divisible"]

#: Activation names a stage may use.
ACTIVATIONS = ("relu", "h_swish")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10 %.

    This is the MobileNet channel rounding rule; the supernet, the subnets and the cost model
    must all use it so that channel counts agree everywhere.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a convolution with "same" padding (``kernel // 2``, odd kernels)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


class BlockSpec:
    """Static facts about one elastic MBConv block of the supernet."""

    __slots__ = (
        "index",
        "stage",
        "position",
        "in_channels",
        "out_channels",
        "stride",
        "activation",
        "use_se",
    )

    def __init__(
        self,
        index: int,
        stage: int,
        position: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: str,
        use_se: bool,
    ) -> None:
        self.index = index
        self.stage = stage
        self.position = position
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.activation = activation
        self.use_se = use_se

    @property
    def residual(self) -> bool:
        """Whether the block has an identity shortcut (shape preserving blocks only)."""
        return self.stride == 1 and self.in_channels == self.out_channels

    def __repr__(self) -> str:
        return (
            f"BlockSpec(index={self.index}, stage={self.stage}, position={self.position}, "
            f"in={self.in_channels}, out={self.out_channels}, stride={self.stride}, "
            f"act={self.activation!r}, se={self.use_se})"
        )
