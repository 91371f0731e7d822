"""Batch-norm recalibration computes the exact statistics of the given images."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lightning_nas.nn.bn_recalibration import recalibrate_batchnorm
from lightning_nas.nn.builders import build_supernet
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4),
        nn.BatchNorm1d(4),
    )


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _exact_stats(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reference: run the same train-mode passes, concatenate every BN input, reduce once."""
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    norms = _norms(model)
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: inputs.setdefault(mod, []).append(a[0].detach()))
        for m in norms
    ]
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = []
    for m in norms:
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs[m]], dim=1).double()
        out.append((x.mean(dim=1), x.var(dim=1, unbiased=True)))
    return out


def test_recalibration_equals_exact_statistics_over_all_images() -> None:
    model = _net()
    # unequal batch sizes: an average of per-batch statistics would be wrong here
    batches = [torch.randn(n, 3, 7, 7) * 2 + 1 for n in (5, 9, 3)]
    expected = _exact_stats(_net(), batches)
    model.eval()
    model[1].momentum = 0.3
    recalibrate_batchnorm(model, batches)
    assert not model.training and not model[1].training
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1
    norms = _norms(model)
    assert len(norms) == len(expected) == 3
    for m, (mean, var) in zip(norms, expected):
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert m.num_batches_tracked.item() == 3


def test_modes_are_restored_per_module_and_tuples_accepted() -> None:
    model = _net().train()
    model[4].eval()  # e.g. a frozen part
    batches = [(torch.randn(4, 3, 7, 7), torch.zeros(4)) for _ in range(3)]
    recalibrate_batchnorm(model, batches, max_images=6)
    assert model.training and model[1].training and not model[4].training
    assert model[1].num_batches_tracked.item() == 2  # 4 images, then 2 of the next batch
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(model, [])


def test_dynamic_batchnorm_recalibration_matches_extracted_subnet() -> None:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    supernet = build_supernet(space)
    config = space.sample(random.Random(0))
    config["e"] = [3] * 20  # every hidden layer narrower than the supernet's
    supernet.set_active(config)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 3, 24, 24, generator=gen) for _ in range(2)]

    subnet = supernet.extract(config)  # stale statistics, recalibrated on its own below
    recalibrate_batchnorm(subnet, batches)
    recalibrate_batchnorm(supernet.eval(), batches)
    assert not supernet.training

    block = space.active_blocks(config)[-1]
    super_bn = supernet.blocks[block].expand.bn
    sub_bn = subnet.blocks[str(block)].expand.bn
    c = sub_bn.num_features
    assert c < super_bn.num_features
    torch.testing.assert_close(super_bn.running_mean[:c], sub_bn.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(super_bn.running_var[:c], sub_bn.running_var, rtol=1e-4, atol=1e-5)
    # channels the subnet never used are left at the reset values
    assert torch.equal(super_bn.running_var[c:], torch.ones(super_bn.num_features - c))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), subnet.eval()(x), rtol=1e-4, atol=1e-4)
