"""Elastic SpaceEvo blocks and stages: every block type extracts to standard layers computing the same."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_nas.nn import static
from lightning_nas.nn.elastic import DynamicBatchNorm2d
from lightning_nas.nn.spaceevo_blocks import (
    DynamicKernelConv2d,
    ElasticBlock,
    ElasticStage,
    PlainBlock,
    PlainStage,
    block_family,
)
from lightning_nas.spaces.spaceevo_layout import BLOCK_TYPES, CIFAR_LAYOUT, SubStage, substage_layers

pytestmark = pytest.mark.usefixtures("one_thread")

#: Modules an extracted stage may contain: standard layers and the plain containers.
PLAIN = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.ModuleList,
         static.ConvBNAct, static.MBConv, static.SqueezeExcite, PlainBlock, PlainStage)
WIDTHS = [8, 16, 24]


def random_substage(rng: random.Random, block_type: str) -> SubStage:
    spec = BLOCK_TYPES[block_type]
    return SubStage(rng.choice(WIDTHS), rng.choice(spec.depths), rng.choice(spec.kernels), rng.choice(spec.expands))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("block_type", sorted(BLOCK_TYPES))
def test_every_block_type_extracts_to_a_plain_stage_with_equal_outputs(
    block_type: str, stride: int, randomise_elastic
) -> None:
    stage = randomise_elastic(ElasticStage(block_type, 16, WIDTHS, stride), seed=stride).eval()
    spec = BLOCK_TYPES[block_type]
    rng = random.Random(10 * sorted(BLOCK_TYPES).index(block_type) + stride)
    largest = SubStage(24, max(spec.depths), max(spec.kernels), max(spec.expands))
    smallest = SubStage(8, min(spec.depths), min(spec.kernels), min(spec.expands))
    # (16 -> 16, stride 1) takes the identity shortcut in block 0, (8 -> 24) cannot
    configs = [(16, largest), (8, smallest), (16, SubStage(16, max(spec.depths), min(spec.kernels), max(spec.expands)))]
    configs += [(rng.choice([8, 12, 16]), random_substage(rng, block_type)) for _ in range(4)]
    x_full = torch.randn(2, 16, 9, 9)
    for in_channels, sub in configs:
        stage.set_active(sub, in_channels)
        x = x_full[:, :in_channels]
        with torch.no_grad():
            expected = stage(x)
        plain = stage.extract()
        assert not plain.training
        assert all(isinstance(m, PLAIN) for m in plain.modules()), (block_type, sub)
        assert len(plain.blocks) == sub.depth
        size = (9 - 1) // stride + 1
        assert expected.shape == (2, sub.width, size, size)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
        # the plain stage has exactly the layers (names, shapes) the torch-free layout describes
        layout_stage = [s.stride for s in CIFAR_LAYOUT.stages].index(stride)  # a stage of that stride
        specs = substage_layers(layout_stage, block_type, sub, in_channels, CIFAR_LAYOUT)
        convs = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
        assert set(convs) == {s.name for s in specs}
        for s in specs:
            c = convs[s.name]
            assert (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.groups) == (
                s.in_channels, s.out_channels, s.kernel_size, s.stride, s.groups)


def test_extracted_stage_macs_equal_the_layout_count() -> None:
    # the layout counts at the stage's input size; run the plain stage on that size
    size = CIFAR_LAYOUT.stage_sizes()[1]
    for block_type in sorted(BLOCK_TYPES):
        stage = ElasticStage(block_type, 32, [16, 24, 32], 2).eval()
        spec = BLOCK_TYPES[block_type]
        sub = SubStage(24, max(spec.depths), max(spec.kernels), min(spec.expands))
        stage.set_active(sub, 24)
        plain = stage.extract()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            plain(torch.randn(1, 24, size, size))
        layers = substage_layers(1, block_type, sub, 24, CIFAR_LAYOUT)
        # FlopCounterMode counts 2 flops per multiply-accumulate of every conv (SE ones included)
        assert counter.get_total_flops() / 2 == sum(s.macs for s in layers), block_type


def test_extraction_copies_weights_and_keeps_the_mode() -> None:
    stage = ElasticStage("mbconv_se", 16, WIDTHS, 2).train()
    stage.set_active(SubStage(16, 3, 3, 4), 16)
    plain = stage.extract()
    assert plain.training
    before = [p.clone() for p in plain.parameters()]
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))
    assert {p.data_ptr() for p in plain.parameters()}.isdisjoint(p.data_ptr() for p in stage.parameters())


def test_depth_runs_the_first_blocks_and_widths_slice_the_largest(randomise_elastic) -> None:
    stage = randomise_elastic(ElasticStage("fused_mbconv", 16, WIDTHS, 1)).eval()
    x = torch.randn(2, 16, 6, 6)
    stage.set_active(SubStage(24, 3, 3, 4), 16)
    with torch.no_grad():
        three = stage(x)
        two = stage.blocks[1](stage.blocks[0](x))
        stage.set_active(SubStage(24, 2, 3, 4), 16)
        torch.testing.assert_close(stage(x), two)
    assert not torch.allclose(three, two)
    # a narrower width is the prefix of the largest weights: block 0's project conv
    stage.set_active(SubStage(8, 1, 3, 2), 16)
    plain = stage.extract()
    full = stage.blocks[0].project.conv.weight
    assert torch.equal(plain.blocks[0].project.conv.weight, full[:8, : plain.blocks[0].project.conv.in_channels])


def test_dense_elastic_kernel_is_the_centre_crop() -> None:
    conv = DynamicKernelConv2d(6, 10, [3, 5, 7], stride=2)
    x = torch.randn(2, 4, 11, 11)
    conv.active_out_channels = 5
    conv.active_kernel_size = 3
    expected = F.conv2d(x, conv.weight[:5, :4, 2:5, 2:5], None, 2, 1)
    torch.testing.assert_close(conv(x), expected)
    with pytest.raises(ValueError, match="odd"):
        DynamicKernelConv2d(4, 4, [2, 3])


def test_families_and_bottleneck_shortcut() -> None:
    assert {block_family(name) for name in BLOCK_TYPES} == {"dual_dw", "inverted", "bottleneck", "fused"}
    with pytest.raises(ValueError, match="unknown block type"):
        block_family("resnext")
    block = ElasticBlock("bottleneck", 16, 16, 1, projection=True)
    assert block.shortcut is not None
    block.set_active(16, 16, 3, 1.0)
    assert block.extract().shortcut is None  # same shapes: the identity
    block.set_active(8, 16, 3, 1.0)
    assert block.extract().shortcut is not None
    plain_only = ElasticBlock("bottleneck", 16, 16, 1)  # later blocks of a stage: no projection weights
    assert plain_only.shortcut is None
    with pytest.raises(ValueError, match="no projection shortcut"):
        plain_only.set_active(8, 16, 3, 1.0)


def test_invalid_sub_stages_and_inputs_are_rejected() -> None:
    stage = ElasticStage("mbconv", 16, WIDTHS, 2)
    with pytest.raises(ValueError, match="width 20"):
        stage.set_active(SubStage(20, 2, 3, 4), 16)
    with pytest.raises(ValueError, match="depth 7"):
        stage.set_active(SubStage(16, 7, 3, 4), 16)
    with pytest.raises(ValueError, match="kernel size 7"):
        stage.set_active(SubStage(16, 2, 7, 4), 16)
    with pytest.raises(ValueError, match="expand ratio 3"):
        stage.set_active(SubStage(16, 2, 3, 3), 16)
    with pytest.raises(ValueError, match="input width 32"):
        stage.set_active(SubStage(16, 2, 3, 4), 32)
    stage.set_active(SubStage(16, 2, 3, 4), 8)
    with pytest.raises(ValueError, match="16 channels"):
        stage(torch.randn(1, 16, 8, 8))


def test_elastic_stage_trains_through_its_batch_norms() -> None:
    stage = ElasticStage("dual_dw", 16, WIDTHS, 2).train()
    stage.set_active(SubStage(16, 2, 5, 1), 12)
    stage(torch.randn(4, 12, 8, 8)).square().mean().backward()
    bn = stage.blocks[0].pw1.bn
    assert isinstance(bn, DynamicBatchNorm2d)
    assert bn.weight.grad[:16].abs().sum() > 0 and bn.weight.grad[16:].abs().sum() == 0
    assert stage.blocks[2].dw1.conv.weight.grad is None  # depth 2: block 2 did not run
