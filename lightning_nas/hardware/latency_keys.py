"""Latency-table keys: how a once-for-all MobileNetV3 network is cut into separately timed units.

A network is cut into *units*: the stem, the fixed first block, every running elastic block, and
the head (final expand conv, global pooling, feature-mix conv, classifier). Units are keyed the way
the once-for-all tables key them, so that tables measured here and the OFA YAML tables users
already have are interchangeable::

    Conv-input:224x224x3-output:112x112x16                 stem
    expanded_conv-input:112x112x16-output:56x56x24-expand:64-kernel:3-stride:2-idskip:0-se:0-hs:0
    Conv_1-input:7x7x160-output:7x7x960                    final expand conv
    AvgPool2D-input:7x7x960-output:1x1x960                 global pooling
    Conv_2-input:1x1x960-output:1x1x1280                   feature-mix conv
    Logits-input:1x1x1280-output:1000                      classifier

(``expand`` is the block's hidden channel count, ``idskip`` the identity shortcut, ``se``
squeeze-excite, ``hs`` h-swish.) The first block is an ``expanded_conv`` whose hidden width
equals its input width. ProxylessNAS spaces key their units with the same functions
(:func:`block_key`, :func:`layer_key`).

This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_nas.hardware.counts import BlockDecomposition
from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.protocol import ElasticSpace

__all__ = ["Unit", "UnitDecomposition", "block_key", "layer_key", "space_units"]


def _shape(*dims: int) -> str:
    return "x".join(str(int(d)) for d in dims)


def block_key(in_size: int, in_channels: int, out_size: int, out_channels: int, mid_channels: int,
              kernel: int, stride: int, idskip: bool, se: bool, h_swish: bool) -> str:
    """The once-for-all key of an MBConv block (``expanded_conv-...``)."""
    return (f"expanded_conv-input:{_shape(in_size, in_size, in_channels)}"
            f"-output:{_shape(out_size, out_size, out_channels)}-expand:{int(mid_channels)}"
            f"-kernel:{int(kernel)}-stride:{int(stride)}-idskip:{int(bool(idskip))}"
            f"-se:{int(bool(se))}-hs:{int(bool(h_swish))}")


def layer_key(kind: str, in_size: int, in_channels: int, out_size: int, out_channels: int) -> str:
    """The once-for-all key of a plain layer (``Conv-input:...-output:...``)."""
    return f"{kind}-input:{_shape(in_size, in_size, in_channels)}-output:{_shape(out_size, out_size, out_channels)}"


@dataclass(frozen=True)
class Unit:
    """One separately timed piece of a network.

    ``module`` is the path of the piece in an extracted subnet (``stem``, ``first_block``,
    ``blocks.<b>``, ``head.final_expand``, ``pool``, ``head.feature_mix``, ``classifier``);
    ``kernel`` / ``expand`` are the choices of the subnet that holds it (elastic blocks only).
    """

    key: str
    kind: str  # Conv, expanded_conv, Conv_1, AvgPool2D, Conv_2, Logits
    module: str
    in_channels: int
    in_size: int
    kernel: int | None = None
    expand: int | None = None

    @property
    def flat_input(self) -> bool:
        return self.kind == "Logits"


def _by_name(specs: Sequence[LayerSpec], name: str) -> LayerSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ValueError(f"the space has no layer '{name}' (expected the OFA MobileNetV3 naming contract)")


def _fixed_units(specs: Sequence[LayerSpec]) -> list[Unit]:
    """Units of the fixed layers of an OFA MobileNetV3 network (see the module docstring)."""
    stem = _by_name(specs, "stem.conv")
    dw = _by_name(specs, "first_block.dw.conv")
    project = _by_name(specs, "first_block.project.conv")
    final = _by_name(specs, "head.final_expand.conv")
    mix = _by_name(specs, "head.feature_mix.conv")
    classifier = _by_name(specs, "classifier.linear")
    # the first block: expand ratio 1, 3x3, ReLU, no squeeze-excite (see the space's layout)
    first_residual = dw.stride == 1 and dw.in_channels == project.out_channels
    return [
        Unit(layer_key("Conv", stem.in_size, stem.in_channels, stem.out_size, stem.out_channels), "Conv",
             "stem", stem.in_channels, stem.in_size),
        Unit(block_key(dw.in_size, dw.in_channels, project.out_size, project.out_channels, dw.out_channels,
                       dw.kernel_size, dw.stride, first_residual, se=False, h_swish=False),
             "expanded_conv", "first_block", dw.in_channels, dw.in_size),
        Unit(layer_key("Conv_1", final.in_size, final.in_channels, final.out_size, final.out_channels), "Conv_1",
             "head.final_expand", final.in_channels, final.in_size),
        Unit(layer_key("AvgPool2D", final.out_size, final.out_channels, 1, final.out_channels), "AvgPool2D",
             "pool", final.out_channels, final.out_size),
        Unit(layer_key("Conv_2", mix.in_size, mix.in_channels, mix.out_size, mix.out_channels), "Conv_2",
             "head.feature_mix", mix.in_channels, mix.in_size),
        Unit(f"Logits-input:{_shape(1, 1, classifier.in_channels)}-output:{classifier.out_channels}", "Logits",
             "classifier", classifier.in_channels, 1),
    ]


def _block_unit(space: ElasticSpace, block: int, specs: Sequence[LayerSpec], kernel: int, expand: int) -> Unit:
    by_role = {spec.role: spec for spec in specs}
    try:
        expand_conv, dw, project = by_role["pw_expand"], by_role["dw"], by_role["pw_project"]
    except KeyError as missing:
        raise ValueError(f"block {block} has no {missing} layer; expected an MBConv block") from None
    info = space.blocks[block]
    key = block_key(expand_conv.in_size, expand_conv.in_channels, project.out_size, project.out_channels,
                    dw.out_channels, dw.kernel_size, dw.stride, info.residual, "se_reduce" in by_role,
                    info.activation == "h_swish")
    return Unit(key, "expanded_conv", f"blocks.{block}", expand_conv.in_channels, expand_conv.in_size,
                kernel, expand)


class UnitDecomposition:
    """The units of every candidate of an OFA MobileNetV3 space, tabulated like
    :class:`~lightning_nas.hardware.counts.BlockDecomposition`: ``fixed[ri]`` and
    ``blocks[ri][b][ki][ei]``."""

    def __init__(self, space: ElasticSpace, decomposition: BlockDecomposition | None = None) -> None:
        self.space = space
        self.decomposition = d = decomposition or BlockDecomposition(space)
        self.fixed: list[list[Unit]] = [_fixed_units(specs) for specs in d.fixed]
        self.blocks: list[list[list[list[Unit]]]] = [
            [[[_block_unit(space, b, d.block_layers[ri][b][ki][ei], k, e) for ei, e in enumerate(d.expands)]
              for ki, k in enumerate(d.kernels)] for b in range(d.num_blocks)]
            for ri in range(len(d.resolutions))
        ]

    def units(self, config: Mapping[str, Any]) -> list[Unit]:
        """The units of one subnet, in execution order."""
        d = self.decomposition
        ri = d.resolutions.index(config["r"])
        fixed = self.fixed[ri]
        blocks = [self.blocks[ri][b][d.kernels.index(config["ks"][b])][d.expands.index(config["e"][b])]
                  for b in self.space.active_blocks(config)]
        return [fixed[0], fixed[1], *blocks, *fixed[2:]]

    def all_units(self, resolutions: Sequence[int] | None = None) -> list[Unit]:
        """Every distinct unit the space can produce at ``resolutions`` (default: all of the space's),
        in an order that keeps units of the same (kernel, expand) subnet together."""
        d = self.decomposition
        wanted = d.resolutions if resolutions is None else list(resolutions)
        unknown = [r for r in wanted if r not in d.resolutions]
        if unknown:
            raise ValueError(f"resolutions {unknown} are not in the space's resolutions {d.resolutions}")
        seen: dict[str, Unit] = {}
        indices = [d.resolutions.index(r) for r in wanted]
        for ri in indices:
            for unit in self.fixed[ri]:
                seen.setdefault(unit.key, unit)
        for ki in range(len(d.kernels)):
            for ei in range(len(d.expands)):
                for ri in indices:
                    for b in range(d.num_blocks):
                        unit = self.blocks[ri][b][ki][ei]
                        seen.setdefault(unit.key, unit)
        return list(seen.values())


def space_units(space: ElasticSpace, resolutions: Sequence[int] | None = None) -> list[Unit]:
    """Every distinct unit (table key) of ``space`` at ``resolutions``."""
    return UnitDecomposition(space).all_units(resolutions)

