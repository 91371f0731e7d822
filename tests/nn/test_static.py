"""The standalone OFA MobileNetV3 subnet's searchable layers (``block_layers``)."""

from __future__ import annotations

from conftest import TINY_SPACE, TINY_SUBNET_CONFIG, tiny_ofa_subnet
from torch import nn

from lightning_nas.registry import SPACES


def test_block_layers_are_every_block_convolution_and_nothing_else() -> None:
    model = tiny_ofa_subnet()
    space = SPACES.build(TINY_SPACE)
    layers = model.block_layers()
    expected = ["first_block.dw.conv", "first_block.project.conv"]
    for b in space.active_blocks(TINY_SUBNET_CONFIG):
        expected += [f"blocks.{b}.expand.conv", f"blocks.{b}.dw.conv"]
        if space.blocks[b].use_se:
            expected += [f"blocks.{b}.se.reduce", f"blocks.{b}.se.expand"]
        expected.append(f"blocks.{b}.project.conv")
    assert layers == expected
    weighted = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    # stem, head and classifier are what stays at fixed bits
    assert weighted - set(layers) == {"stem.conv", "head.final_expand.conv", "head.feature_mix.conv",
                                      "classifier.linear"}
    depthwise = [n for n in layers if model.get_submodule(n).groups > 1]
    assert depthwise == [n for n in expected if ".dw." in n]
    assert any(".se." in n for n in layers)
