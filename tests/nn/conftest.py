"""Helpers shared by the tests of the elastic networks."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def randomise_elastic() -> Callable:
    """``randomise(net, seed)``: non-trivial batch-norm statistics and affine parameters and
    perturbed kernel transforms, so that a wrong slice or a missing copy shows in the outputs."""
    import torch
    from torch import nn

    from lightning_nas.nn.elastic import DynamicDepthwiseConv2d

    def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                if isinstance(m, DynamicDepthwiseConv2d):
                    for p in m.kernel_transforms():
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return net

    return randomise
