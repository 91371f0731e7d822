"""Networks of the torch-free search spaces: the supernet and a standalone network per space kind.

The spaces (:mod:`lightning_nas.spaces`) describe architectures without torch; building their
networks belongs to this layer, so nothing in the core imports upwards. Each builder is registered
for a space class with :func:`functools.singledispatch` (layout variants such as the CIFAR
layouts are presets of the same class, so they share its builder); a new space kind registers its
own here. Building is the one job of a space that is not in the torch-free
:class:`~lightning_nas.spaces.protocol.SearchSpace` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import singledispatch
from typing import Any

from torch import nn

from lightning_nas.nn.nb201 import NB201Network
from lightning_nas.nn.ofa_mbv3 import OFAMobileNetV3
from lightning_nas.nn.proxyless_net import ProxylessNet, ProxylessSupernet
from lightning_nas.nn.spaceevo_net import SpaceEvoSubnet, SpaceEvoSupernet
from lightning_nas.nn.static import MobileNetV3Subnet
from lightning_nas.spaces.nb201 import NB201Space
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.protocol import SearchSpace
from lightning_nas.spaces.proxyless import ProxylessSpace
from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace

__all__ = ["build_subnet", "build_supernet"]


@singledispatch
def build_supernet(space: SearchSpace, **options: Any) -> nn.Module:
    """The weight-sharing supernet of ``space`` (options depend on the space kind)."""
    raise TypeError(f"no supernet is registered for {type(space).__name__}")


@build_supernet.register(OFAMobileNetV3Space)
def _ofa_supernet(space: OFAMobileNetV3Space) -> OFAMobileNetV3:
    """The elastic once-for-all supernet."""
    return OFAMobileNetV3(space)


@build_supernet.register(ProxylessSpace)
def _proxyless_supernet(space: ProxylessSpace, mixed_op: str = "binary") -> ProxylessSupernet:
    """The over-parameterised network; ``mixed_op`` is ``binary`` or ``all_paths``."""
    return ProxylessSupernet(space, mixed_op=mixed_op)


@build_supernet.register(SpaceEvoSubnetSpace)
def _spaceevo_supernet(space: SpaceEvoSubnetSpace) -> SpaceEvoSupernet:
    """The elastic supernet of one SpaceEvo space (stages of possibly different block types)."""
    return SpaceEvoSupernet(space)


@singledispatch
def build_subnet(space: SearchSpace, arch: Any) -> nn.Module:
    """A freshly initialised standalone network of plain torch layers for one architecture of ``space``.

    Use :meth:`~lightning_nas.nn.ofa_mbv3.OFAMobileNetV3.extract` to get an OFA subnet with the
    supernet's weights.
    """
    raise TypeError(f"no network builder is registered for {type(space).__name__}")


@build_subnet.register(OFAMobileNetV3Space)
def _ofa_subnet(space: OFAMobileNetV3Space, arch: Mapping[str, Any]) -> MobileNetV3Subnet:
    return MobileNetV3Subnet(space, space.canonical(arch))


@build_subnet.register(ProxylessSpace)
def _proxyless_subnet(space: ProxylessSpace, arch: Sequence[str] | Mapping[str, Any]) -> ProxylessNet:
    return ProxylessNet(space, space.validate(arch))


@build_subnet.register(SpaceEvoSubnetSpace)
def _spaceevo_subnet(space: SpaceEvoSubnetSpace, arch: Mapping[str, Any]) -> SpaceEvoSubnet:
    return SpaceEvoSubnet(space, arch)


@build_subnet.register(NB201Space)
def _nb201_subnet(space: NB201Space, arch: str) -> NB201Network:
    return NB201Network(
        arch,
        num_classes=space.num_classes,
        init_channels=space.init_channels,
        cells_per_stage=space.cells_per_stage,
    )
