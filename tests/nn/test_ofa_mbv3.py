"""The OFA MobileNetV3 supernet: subnet selection, extraction, costs, channel reorder, shrinking."""

from __future__ import annotations

import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_nas.nn import static
from lightning_nas.nn.builders import build_subnet, build_supernet
from lightning_nas.nn.elastic import DynamicBatchNorm2d, DynamicDepthwiseConv2d
from lightning_nas.nn.ofa_mbv3 import OFAMobileNetV3
from lightning_nas.nn.shrinking import shrinking_step, soft_cross_entropy
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

PLAIN = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.Linear,
    nn.ReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.ModuleDict,
    static.ConvBNAct,
    static.MBConv,
    static.SqueezeExcite,
    static.Head,
    static.Classifier,
    static.MobileNetV3Subnet,
)


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def imagenet(randomise_elastic) -> tuple[OFAMobileNetV3Space, OFAMobileNetV3]:
    space = OFAMobileNetV3Space(num_classes=10, resolutions=[32, 48, 64])
    return space, randomise_elastic(build_supernet(space).eval())


@pytest.fixture(scope="module")
def cifar(randomise_elastic) -> tuple[OFAMobileNetV3Space, OFAMobileNetV3]:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    return space, randomise_elastic(build_supernet(space).eval(), seed=1)


def _configs(space: OFAMobileNetV3Space, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_extracted_subnet_matches_supernet(layout: str, request: pytest.FixtureRequest) -> None:
    space, supernet = request.getfixturevalue(layout)
    torch.manual_seed(0)
    for i, config in enumerate(_configs(space, 3, seed=10)):
        subnet = supernet.extract(config)
        assert not subnet.training
        assert all(isinstance(m, PLAIN) for m in subnet.modules()), {
            type(m).__name__ for m in subnet.modules()
        }
        supernet.set_active(config)
        for r in space.resolutions[i % 2 :: 2] or space.resolutions:
            x = torch.randn(2, 3, r, r)
            with torch.no_grad():
                diff = (supernet(x) - subnet(x)).abs().max().item()
            assert diff < 1e-5, (config, r, diff)


def test_extraction_is_independent_of_the_supernet(cifar) -> None:
    space, supernet = cifar
    config = space.sample(random.Random(3))
    supernet.set_max()
    subnet = supernet.extract(config)
    assert supernet.active_config == space.largest()  # left unchanged
    assert subnet.config == config
    before = supernet.blocks[0].expand.conv.weight.clone()
    with torch.no_grad():
        for p in subnet.parameters():
            p.zero_()
    assert torch.equal(supernet.blocks[0].expand.conv.weight, before)


def test_extracted_subnet_roundtrips_through_torch_save(cifar) -> None:
    space, supernet = cifar
    config = space.sample(random.Random(4))
    subnet = supernet.extract(config)
    x = torch.randn(2, 3, 28, 28)
    buffer = io.BytesIO()
    torch.save(subnet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), subnet(x))
        rebuilt = build_subnet(space, config).eval()
        rebuilt.load_state_dict(subnet.state_dict())
        torch.testing.assert_close(rebuilt(x), subnet(x))


def test_channels_last_supernet_matches_extracted(imagenet, randomise_elastic) -> None:
    space, supernet = imagenet
    config = space.sample(random.Random(5))
    subnet = supernet.extract(config)
    fast = randomise_elastic(build_supernet(space), seed=0).to(memory_format=torch.channels_last).eval()
    fast.load_state_dict(supernet.state_dict())
    fast.set_active(config)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        diff = (fast(x.contiguous(memory_format=torch.channels_last)) - subnet(x)).abs().max().item()
    assert diff < 1e-5


def test_set_active_validates_and_forward_accepts_any_resolution(imagenet) -> None:
    space, supernet = imagenet
    with pytest.raises(ValueError, match=r"config\['ks'\]\[0\] = 4"):
        supernet.set_active(dict(space.largest(), ks=[4] * 20))
    config = space.sample(random.Random(6))
    supernet.set_active(config)
    assert supernet.active_config == config
    with torch.no_grad():
        for r in (40, 57):
            assert supernet(torch.randn(1, 3, r, r)).shape == (1, 10)
    supernet.set_max()
    assert supernet.active_config == space.largest()


def test_layer_spec_names_address_the_same_layer_in_both_networks(imagenet) -> None:
    space, supernet = imagenet
    config = space.sample(random.Random(7))
    subnet = supernet.extract(config)
    super_modules = dict(supernet.named_modules())
    sub_modules = dict(subnet.named_modules())
    for spec in space.layer_specs(config):
        elastic, plain = super_modules[spec.name], sub_modules[spec.name]
        assert elastic.weight_quantizer is None and elastic.input_quantizer is None
        if spec.op == "linear":
            assert isinstance(plain, nn.Linear)
            assert (plain.in_features, plain.out_features) == (spec.in_channels, spec.out_channels)
            continue
        assert isinstance(plain, nn.Conv2d)
        assert (
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size[0],
            plain.stride[0],
            plain.groups,
        ) == (spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.groups)
        assert (plain.bias is not None) == spec.bias
    convs = {n for n, m in subnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert convs == {s.name for s in space.layer_specs(config)}


@pytest.mark.parametrize("layout", ["imagenet", "cifar"])
def test_macs_and_params_match_independent_counts(layout: str, request: pytest.FixtureRequest) -> None:
    space, supernet = request.getfixturevalue(layout)
    for config in _configs(space, 2, seed=11):
        subnet = supernet.extract(config)
        r = config["r"]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            subnet(torch.randn(1, 3, r, r))
        macs = counter.get_total_flops() / 2
        assert space.macs(config) == pytest.approx(macs, rel=0.01)
        assert space.params(config) == pytest.approx(sum(p.numel() for p in subnet.parameters()), rel=0.01)


def _block_importance(block) -> torch.Tensor:
    return block.project.conv.weight.detach().abs().sum(dim=(0, 2, 3))


def test_reorder_channels_keeps_full_network_and_sorts_importance(cifar, randomise_elastic) -> None:
    space, _ = cifar
    supernet = randomise_elastic(build_supernet(space), seed=3).eval()
    x = torch.randn(2, 3, 32, 32)
    supernet.set_max()
    with torch.no_grad():
        before = supernet(x)
    supernet.reorder_channels()
    with torch.no_grad():
        after = supernet(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for block in supernet.blocks:
        importance = _block_importance(block)
        assert torch.all(importance[:-1] >= importance[1:])
        if block.se is not None:
            se_importance = block.se.expand.weight.detach().abs().sum(dim=(0, 2, 3))
            assert torch.all(se_importance[:-1] >= se_importance[1:])


def test_reorder_with_kept_ratio_preserves_that_subnet_and_optimizer_state(cifar, randomise_elastic) -> None:
    space, _ = cifar
    supernet = randomise_elastic(build_supernet(space), seed=4).eval()
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.1, momentum=0.9)
    supernet.set_max()
    F.cross_entropy(supernet(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    optimizer.step()
    config = dict(space.largest(), e=[4] * 20)
    x = torch.randn(2, 3, 32, 32)
    supernet.set_active(config)
    with torch.no_grad():
        before = supernet(x)
    block = supernet.blocks[5]
    weight = block.project.conv.weight.detach().clone()
    momentum = optimizer.state[block.project.conv.weight]["momentum_buffer"].clone()
    mid4 = space.mid_channels(5, 4)
    order = torch.cat(
        [
            torch.sort(_block_importance(block)[:mid4], descending=True, stable=True).indices,
            torch.sort(_block_importance(block)[mid4:], descending=True, stable=True).indices + mid4,
        ]
    )
    supernet.reorder_channels(keep_expand_ratios=[4], optimizer=optimizer)
    torch.testing.assert_close(block.project.conv.weight, weight[:, order])
    torch.testing.assert_close(
        optimizer.state[block.project.conv.weight]["momentum_buffer"], momentum[:, order]
    )
    supernet.set_active(config)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), before, atol=1e-5, rtol=1e-5)


def test_param_groups_exclude_bn_bias_and_transforms(cifar) -> None:
    _, supernet = cifar
    decay, rest = supernet.param_groups(3e-5)
    assert decay["weight_decay"] == 3e-5 and rest["weight_decay"] == 0.0
    ids = {id(p) for p in rest["params"]}
    for m in supernet.modules():
        if isinstance(m, DynamicBatchNorm2d):
            assert id(m.weight) in ids
        if isinstance(m, DynamicDepthwiseConv2d):
            assert all(id(p) in ids for p in m.kernel_transforms()) and id(m.weight) not in ids
    assert len(decay["params"]) + len(rest["params"]) == len(list(supernet.parameters()))


def test_soft_cross_entropy_matches_probability_targets() -> None:
    logits, target = torch.randn(4, 7), torch.softmax(torch.randn(4, 7), dim=1)
    torch.testing.assert_close(soft_cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_shrinking_step_accumulates_subnet_gradients() -> None:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", dropout=0.0)
    supernet = build_supernet(space).train()
    rng = random.Random(8)
    configs = [space.sample(rng) for _ in range(3)]
    images, labels = torch.randn(4, 3, 24, 24), torch.randint(0, 10, (4,))
    teacher_logits = torch.randn(4, 10)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}

    # reference: the same subnets one by one, summing gradients by hand
    expected = {n: torch.zeros_like(p) for n, p in supernet.named_parameters()}
    losses, correct = [], []
    for config in configs:
        supernet.zero_grad()
        supernet.set_active(config)
        logits = supernet(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5 * soft_cross_entropy(
            logits, teacher_logits.softmax(1)
        )
        loss.backward()
        losses.append(loss.item())
        correct.append(int((logits.argmax(1) == labels).sum()))
        for n, p in supernet.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad

    supernet.load_state_dict(state)
    supernet.zero_grad()
    calls = []

    def backward(loss: torch.Tensor) -> None:
        calls.append(loss.item())
        loss.backward()

    out = shrinking_step(
        supernet,
        images,
        labels,
        configs,
        teacher_logits,
        kd_ratio=0.5,
        label_smoothing=0.1,
        backward=backward,
    )
    assert len(calls) == 3
    assert calls == pytest.approx(losses, rel=1e-5)
    assert out["loss"].item() == pytest.approx(sum(losses) / 3, rel=1e-5)
    # top-1 in percent: the mean over subnets of each one's share of correct labels
    assert out["top1"].item() == pytest.approx(100 * sum(correct) / (3 * len(labels)), rel=1e-6)
    assert out["num_subnets"].item() == 3
    for n, p in supernet.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, expected[n], atol=1e-5, rtol=1e-4)
    # gradients of three different subnets really were combined
    skipped = [b for b in range(20) if not any(b in space.active_blocks(c) for c in configs)]
    ran = [b for b in range(20) if b not in skipped]
    assert all(supernet.blocks[b].project.conv.weight.grad.abs().sum() > 0 for b in ran)
    assert all(supernet.blocks[b].project.conv.weight.grad is None for b in skipped)
    with pytest.raises(ValueError):
        shrinking_step(supernet, images, labels, [])
