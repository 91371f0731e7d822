"""The elastic supernet of one SpaceEvo space and its standalone subnets.

:class:`SpaceEvoSupernet` holds, for a :class:`~lightning_nas.spaces.spaceevo_space.SpaceEvoSubnetSpace`,
the stem, one :class:`~lightning_nas.nn.spaceevo_blocks.ElasticStage` per stage (of possibly
different block types, each as wide as its window's largest width), the head and the classifier;
:meth:`~SpaceEvoSupernet.set_active` selects a subnet config and :meth:`~SpaceEvoSupernet.extract`
copies it into a :class:`SpaceEvoSubnet` of standard layers. Module names are those of the
space's layer specs (``stem.conv``, ``stages.{s}.blocks.{i}.<layer>.conv``, ``head.conv``,
``classifier.linear``) in both networks.

Both networks expose their stages for block-wise distillation: ``net.stages[s]`` is stage ``s``
and :meth:`~SpaceEvoSupernet.forward_stages` returns the stem output followed by every stage's
output (entry ``s`` is stage ``s``'s input, entry ``s + 1`` its output).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nas.nn.elastic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, copy_active_weights
from lightning_nas.nn.ofa_mbv3 import DynamicConvBN
from lightning_nas.nn.spaceevo_blocks import ElasticStage, PlainStage, plain_block
from lightning_nas.nn.static import Classifier, ConvBNAct, init_mobilenet
from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace

__all__ = ["SpaceEvoSubnet", "SpaceEvoSupernet"]


class _StagedNetwork(nn.Module):
    """Stem -> stages -> head (1x1 conv, BN, act) -> global pool -> classifier."""

    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Module
    classifier: nn.Module

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The stem output and the output of every stage (``len(stages) + 1`` tensors)."""
        outputs = [self.stem(x)]
        for stage in self.stages:
            outputs.append(stage(outputs[-1]))
        return outputs

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the last stage's output."""
        return self.classifier(torch.flatten(self.head(features).mean((2, 3)), 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.forward_head(x)


class SpaceEvoSupernet(_StagedNetwork):
    """Elastic supernet of a :class:`SpaceEvoSubnetSpace`; runs the subnet :meth:`set_active` chose
    (initially the largest)."""

    def __init__(self, space: SpaceEvoSubnetSpace, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.space = space
        layout = space.layout

        def unit(conv: nn.Module, channels: int, act: str | None) -> DynamicConvBN:
            return DynamicConvBN(conv, DynamicBatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum), act)

        stem = layout.stem
        self.stem = unit(DynamicConv2d(layout.in_channels, stem.channels, stem.kernel, stem.stride), stem.channels,
                         stem.activation)
        stages = []
        in_channels = stem.channels
        for s in range(space.num_stages):
            stages.append(ElasticStage(space.block_types[s], in_channels, space.stage_widths[s],
                                       space.stage_strides[s], bn_momentum, bn_eps))
            in_channels = stages[-1].max_width
        self.stages = nn.ModuleList(stages)
        self.head = unit(DynamicConv2d(in_channels, layout.head.channels), layout.head.channels,
                         layout.head.activation)
        self.classifier = Classifier(DynamicLinear(layout.head.channels, layout.num_classes), layout.head.dropout)
        self._active_config: dict = {}
        self.set_active(space.largest())

    def set_active(self, config: Mapping[str, Any]) -> None:
        """Make ``config`` (validated against the space) the subnet that ``forward`` runs."""
        substages = self.space.substages(config)
        in_channels = self.space.layout.stem.channels
        for stage, sub in zip(self.stages, substages):
            stage.set_active(sub, in_channels)
            in_channels = sub.width
        self._active_config = self.space.validate(config)

    @property
    def active_config(self) -> dict:
        """A copy of the active subnet's config."""
        return {key: list(values) for key, values in self._active_config.items()}

    def sample_active(self, rng: random.Random) -> dict:
        """Select a uniformly random subnet drawn from ``rng`` and return its config."""
        config = self.space.sample(rng)
        self.set_active(config)
        return config

    @torch.no_grad()
    def extract(self, config: Mapping[str, Any] | None = None) -> SpaceEvoSubnet:
        """A standalone :class:`SpaceEvoSubnet` of ``config`` (default: the active one) with copied
        weights, on the supernet's device and dtype and in its train / eval mode; the supernet's
        active subnet is left as it was."""
        previous = self._active_config
        config = self.space.validate(previous if config is None else config)
        self.set_active(config)
        try:
            ref = next(self.parameters())
            subnet = SpaceEvoSubnet(self.space, config).to(device=ref.device, dtype=ref.dtype)
            copy_active_weights(subnet, self)
        finally:
            self.set_active(previous)
        return subnet.train(self.training)


class SpaceEvoSubnet(_StagedNetwork):
    """A standalone subnet of a :class:`SpaceEvoSubnetSpace` made of standard layers.

    Built from a space and a config with fresh weights (MobileNet initialisation); :meth:`SpaceEvoSupernet.extract` fills one
    with supernet weights. ``space`` and ``config`` are kept as attributes, so
    ``SpaceEvoSubnet(subnet.space, subnet.config)`` rebuilds the architecture for a ``state_dict``.
    """

    def __init__(self, space: SpaceEvoSubnetSpace, config: Mapping[str, Any], bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.space = space
        self.config = space.validate(config)
        layout = space.layout
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        stem = layout.stem
        self.stem = ConvBNAct(layout.in_channels, stem.channels, stem.kernel, stem.stride,
                              activation=stem.activation, **bn)
        stages = []
        in_channels = stem.channels
        for s, sub in enumerate(space.substages(self.config)):
            blocks = []
            for i in range(sub.depth):
                blocks.append(plain_block(space.block_types[s], in_channels, sub.width,
                                          space.stage_strides[s] if i == 0 else 1, sub.kernel, sub.expand, **bn))
                in_channels = sub.width
            stages.append(PlainStage(blocks))
        self.stages = nn.ModuleList(stages)
        self.head = ConvBNAct(in_channels, layout.head.channels, 1, activation=layout.head.activation, **bn)
        self.classifier = Classifier(nn.Linear(layout.head.channels, layout.num_classes), layout.head.dropout)
        init_mobilenet(self)
