"""Layer specs of once-for-all MobileNetV3 subnets, and the counts read off them (torch-free).

:meth:`OFAMobileNetV3Space.layer_specs <lightning_nas.spaces.ofa_mbv3.OFAMobileNetV3Space.layer_specs>`,
``batchnorm_channels``, ``macs`` and ``params`` call these functions. Names follow the module
naming contract stated in :mod:`lightning_nas.spaces.ofa_mbv3`, so a spec names the same module in
the supernet and in the extracted subnet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.ofa_layout import conv_out

if TYPE_CHECKING:
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

__all__ = ["batchnorm_channels", "layer_specs", "macs", "params"]


def layer_specs(space: OFAMobileNetV3Space, config: Mapping[str, Any], resolution: int | None = None) -> list[LayerSpec]:
    """Every convolution / linear layer of the subnet, in execution order; ``resolution`` overrides
    ``config["r"]`` (the network runs at any input size; only the config must use the space's)."""
    config = space.validate(config)
    size = config["r"] if resolution is None else int(resolution)
    specs: list[LayerSpec] = []

    def conv(name: str, cin: int, cout: int, k: int, stride: int, groups: int, in_size: int, bias: bool,
             role: str, block: int | None = None, op: str = "conv") -> int:
        out_size = conv_out(in_size, k, stride)
        specs.append(LayerSpec(name=name, op=op, in_channels=cin, out_channels=cout, kernel_size=k, stride=stride,
                               groups=groups, in_size=in_size, out_size=out_size, bias=bias, role=role, block=block))
        return out_size

    size = conv("stem.conv", 3, space.stem_channels, 3, space.stem_stride, 1, size, False, "stem")
    c = space.stem_channels
    size = conv("first_block.dw.conv", c, c, 3, 1, c, size, False, "dw")
    conv("first_block.project.conv", c, space.first_block_channels, 1, 1, 1, size, False, "pw_project")
    for b in space.active_blocks(config):
        spec = space.blocks[b]
        mid = space.mid_channels(b, config["e"][b])
        k = config["ks"][b]
        p = f"blocks.{b}"
        conv(f"{p}.expand.conv", spec.in_channels, mid, 1, 1, 1, size, False, "pw_expand", b)
        out = conv(f"{p}.dw.conv", mid, mid, k, spec.stride, mid, size, False, "dw", b)
        if spec.use_se:
            se = space.se_channels(mid)
            conv(f"{p}.se.reduce", mid, se, 1, 1, 1, 1, True, "se_reduce", b)
            conv(f"{p}.se.expand", se, mid, 1, 1, 1, 1, True, "se_expand", b)
        conv(f"{p}.project.conv", mid, spec.out_channels, 1, 1, 1, out, False, "pw_project", b)
        size = out
    last = space.widths[-1] if space.num_blocks else space.first_block_channels
    conv("head.final_expand.conv", last, space.head_channels, 1, 1, 1, size, False, "head")
    conv("head.feature_mix.conv", space.head_channels, space.feature_channels, 1, 1, 1, 1, False, "head")
    conv("classifier.linear", space.feature_channels, space.num_classes, 1, 1, 1, 1, True, "classifier",
         op="linear")
    return specs


def batchnorm_channels(space: OFAMobileNetV3Space, config: Mapping[str, Any]) -> list[int]:
    """Channel count of every batch norm of the subnet (one per conv except SE / feature mix)."""
    config = space.validate(config)
    out = [space.stem_channels, space.stem_channels, space.first_block_channels]
    for b in space.active_blocks(config):
        mid = space.mid_channels(b, config["e"][b])
        out += [mid, mid, space.blocks[b].out_channels]
    out.append(space.head_channels)
    return out


def macs(space: OFAMobileNetV3Space, config: Mapping[str, Any], resolution: int | None = None) -> int:
    """Multiply-accumulates of one image through the convolutions and linear layers (pooling,
    activations, batch norm and the squeeze-excite scaling are not counted)."""
    return sum(spec.macs for spec in layer_specs(space, config, resolution))


def params(space: OFAMobileNetV3Space, config: Mapping[str, Any]) -> int:
    """Conv / linear weights and biases plus the batch-norm affine weights and biases (2 per
    channel; running statistics are buffers and are not counted)."""
    return sum(spec.params for spec in layer_specs(space, config)) + 2 * sum(batchnorm_channels(space, config))
