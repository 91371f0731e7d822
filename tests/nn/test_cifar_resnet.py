from __future__ import annotations

import pytest
import torch

from lightning_nas.nn.cifar_resnet import cifar_resnet


def test_resnet20_has_the_papers_size_and_18_block_convolutions() -> None:
    model = cifar_resnet(20)
    # He et al. 2016, table 6: 0.27M parameters
    assert sum(p.numel() for p in model.parameters()) == 269_722
    layers = model.block_layers()
    assert len(layers) == 18 and layers[0] == "layer1.0.conv1" and layers[-1] == "layer3.2.conv2"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_depth_must_be_6n_plus_2() -> None:
    assert len(cifar_resnet(8).block_layers()) == 6
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(21)


def test_option_a_shortcut_pads_channels_with_zeros() -> None:
    block = cifar_resnet(8).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (1, 32, 4, 4)
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0
