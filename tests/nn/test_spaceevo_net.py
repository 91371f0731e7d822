"""The SpaceEvo supernet of one space: mixed block types, subnet extraction, costs, stage outputs."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_nas.nn import static
from lightning_nas.nn.builders import build_subnet, build_supernet
from lightning_nas.nn.spaceevo_blocks import PlainBlock, PlainStage
from lightning_nas.nn.spaceevo_net import SpaceEvoSubnet, SpaceEvoSupernet
from lightning_nas.spaces.spaceevo_layout import (
    HeadSpec,
    MacroLayout,
    StageSpec,
    StemSpec,
    homogeneous_spaces,
)
from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace

pytestmark = pytest.mark.usefixtures("one_thread")

#: Six stages, so that one network holds every block type; 16 px inputs and tiny widths.
TINY = MacroLayout(
    name="tiny",
    resolution=16,
    num_classes=5,
    stem=StemSpec(channels=8),
    stages=(StageSpec(1, (8, 12, 16)), StageSpec(2, (8, 16, 24)), StageSpec(1, (16, 24)),
            StageSpec(2, (16, 24, 32)), StageSpec(1, (24, 32)), StageSpec(2, (24, 32, 40))),
    head=HeadSpec(channels=32),
)
MIXED = "dual_dw[0:3]-mbconv[0:3]-mbconv_se[0:2]-bottleneck[1:3]-fused_mbconv[0:2]-fused_mbconv_se[0:3]"
PLAIN_NET = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Dropout,
             nn.ModuleList, static.ConvBNAct, static.MBConv, static.SqueezeExcite, static.Classifier, PlainBlock,
             PlainStage, SpaceEvoSubnet)


@pytest.fixture(scope="module")
def mixed(randomise_elastic) -> tuple[SpaceEvoSubnetSpace, SpaceEvoSupernet]:
    space = SpaceEvoSubnetSpace(MIXED, TINY)
    return space, randomise_elastic(build_supernet(space), seed=3).eval()


def configs(space: SpaceEvoSubnetSpace, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]


def test_supernet_has_one_stage_per_block_type(mixed) -> None:
    space, supernet = mixed
    assert [stage.block_type for stage in supernet.stages] == space.block_types
    assert len(set(space.block_types)) == 6


def test_extracted_subnets_match_the_supernet(mixed) -> None:
    space, supernet = mixed
    x = torch.randn(2, 3, 16, 16)
    for config in configs(space, 4, seed=0):
        supernet.set_active(config)
        with torch.no_grad():
            expected = supernet(x)
        subnet = supernet.extract()
        assert subnet.config == config and not subnet.training
        assert all(isinstance(m, PLAIN_NET) for m in subnet.modules())
        assert expected.shape == (2, 5)
        with torch.no_grad():
            torch.testing.assert_close(subnet(x), expected, atol=1e-5, rtol=1e-5)


def test_extract_of_another_config_keeps_the_active_one(mixed) -> None:
    space, supernet = mixed
    small, large = space.smallest(), space.largest()
    supernet.set_active(small)
    supernet.extract(large)
    assert supernet.active_config == small
    supernet.set_active(large)


def test_stage_outputs_for_block_wise_distillation(mixed) -> None:
    space, supernet = mixed
    config = space.sample(random.Random(7))
    supernet.set_active(config)
    subnet = supernet.extract()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outputs = supernet.forward_stages(x)
        plain_outputs = subnet.forward_stages(x)
        assert len(outputs) == space.num_stages + 1
        sizes = [16, 16, 8, 8, 4, 4, 2]
        for s, out in enumerate(outputs):
            width = TINY.stem.channels if s == 0 else config["w"][s - 1]
            assert out.shape == (2, width, sizes[s], sizes[s])
            torch.testing.assert_close(plain_outputs[s], out, atol=1e-5, rtol=1e-5)
        # stages are addressable: stage s maps output s to output s + 1, alone
        for s in range(space.num_stages):
            torch.testing.assert_close(supernet.stages[s](outputs[s]), outputs[s + 1])
        torch.testing.assert_close(supernet.forward_head(outputs[-1]), supernet(x))


def test_macs_params_and_layer_names_match_the_built_subnet(mixed) -> None:
    space, supernet = mixed
    for config in configs(space, 2, seed=1):
        subnet = supernet.extract(config)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            subnet(torch.randn(1, 3, 16, 16))
        assert space.macs(config) == counter.get_total_flops() / 2
        assert space.params(config) == sum(p.numel() for p in subnet.parameters())
        layers = {n for n, m in subnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        assert layers == {spec.name for spec in space.layer_specs(config)}
        supernet_names = {n for n, _ in supernet.named_modules()}
        assert layers <= supernet_names  # a spec names the same layer in both networks


def test_cifar_layout_shapes_at_32_px() -> None:
    choice = homogeneous_spaces()[1]  # mbconv everywhere, default windows
    space = SpaceEvoSubnetSpace(choice)
    net = SpaceEvoSubnet(space, space.smallest()).eval()
    with torch.no_grad():
        outputs = net.forward_stages(torch.randn(2, 3, 32, 32))
    # stem stride 1, stage strides 2, 2, 2, 1, 2
    assert [o.shape[-1] for o in outputs] == [32, 16, 8, 4, 4, 2]
    assert [o.shape[1] for o in outputs[1:]] == space.smallest()["w"]


def test_homogeneous_mbconv_se_subnet_is_the_hand_built_mobilenet_v3(randomise_elastic) -> None:
    choice = next(c for c in homogeneous_spaces() if {s.block_type for s in c.stages} == {"mbconv_se"})
    space = SpaceEvoSubnetSpace(choice)
    config = space.sample(random.Random(5))
    supernet = randomise_elastic(build_supernet(space), seed=5).eval()
    subnet = supernet.extract(config)

    # the same network written out by hand from the plain MobileNetV3 layers
    class Hand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = static.ConvBNAct(3, 24, 3, 1, activation="h_swish")
            stages, cin = [], 24
            for width, depth, k, e, stride in zip(config["w"], config["d"], config["ks"], config["e"],
                                                  (2, 2, 2, 1, 2)):
                blocks = []
                for i in range(depth):
                    mid = _div8(cin * e)
                    blocks.append(static.MBConv(cin, mid, width, k, stride if i == 0 else 1, "h_swish",
                                                se_hidden=_div8(mid // 4)))
                    cin = width
                stages.append(PlainStage(blocks))
            self.stages = nn.ModuleList(stages)
            self.head = static.ConvBNAct(cin, 640, 1, activation="h_swish")
            self.classifier = static.Classifier(nn.Linear(640, 10), 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
            return self.classifier(self.head(x).mean((2, 3)))

    hand = Hand().eval()
    assert [(n, type(m)) for n, m in hand.named_modules() if n] == [
        (n, type(m)) for n, m in subnet.named_modules() if n
    ]
    assert not any(isinstance(m, PlainBlock) for m in subnet.modules())  # MBConv blocks are static.MBConv
    hand.load_state_dict(subnet.state_dict())  # same names and shapes, strictly
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hand(x), subnet(x))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hand(x[:1])
    assert space.macs(config) == counter.get_total_flops() / 2


def _div8(value: float) -> int:
    """MobileNet channel rounding, written out independently of the project's make_divisible."""
    rounded = max(8, int(value + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * value else rounded


def test_builders_dispatch_on_the_space() -> None:
    space = SpaceEvoSubnetSpace(MIXED, TINY)
    assert isinstance(build_supernet(space), SpaceEvoSupernet)
    config = space.smallest()
    net = build_subnet(space, config)
    assert isinstance(net, SpaceEvoSubnet) and net.config == config
    rebuilt = SpaceEvoSubnet(net.space, net.config)
    rebuilt.load_state_dict(net.state_dict())


def test_supernet_trains_a_sampled_subnet(mixed) -> None:
    space, _ = mixed
    supernet = build_supernet(space).train()
    config = supernet.sample_active(random.Random(2))
    assert supernet.active_config == config
    supernet(torch.randn(2, 3, 16, 16)).logsumexp(1).mean().backward()
    grads = [p.grad for p in supernet.stages[0].blocks[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)



def test_extracted_subnet_traces_with_fx(mixed) -> None:
    space, supernet = mixed
    subnet = supernet.extract(space.sample(random.Random(9)))
    traced = torch.fx.symbolic_trace(subnet)  # int8 conversion and ONNX export need a traceable net
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), subnet(x))


@pytest.mark.slow
def test_extracted_subnet_converts_to_int8(mixed) -> None:
    from lightning_nas.deploy.int8 import convert_to_int8

    space, supernet = mixed
    subnet = supernet.extract(space.sample(random.Random(9)))
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = subnet(x)
        got = convert_to_int8(subnet, [x], backend="onednn")(x)
    # post-training int8 of a randomly initialised net: close, not equal
    assert got.shape == expected.shape
    assert (got - expected).norm() < 0.2 * expected.norm()
