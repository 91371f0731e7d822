from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_nas.nn.builders import build_subnet
from lightning_nas.predictors.zero_cost import (
    PROXIES,
    ProxyResult,
    compute_proxies,
    compute_proxy,
    node_layers,
)
from lightning_nas.spaces.nb201 import NB201Space

ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
MIXED = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
ALL_POOL = "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|"
SMALL = NB201Space(num_classes=10, init_channels=4, cells_per_stage=1)
EXPECTED = {"grad_norm", "snip", "grasp", "fisher", "jacov", "synflow", "nwot", "zen", "params", "flops"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _net(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_subnet(SMALL, arch)


def _finite(r: ProxyResult) -> bool:
    return math.isfinite(r.score) and all(math.isfinite(v) for v in r.node_stats.values())


class TinyCNN(nn.Module):
    """A non-NB201 classifier with in-place activations and a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


def test_registry() -> None:
    assert set(PROXIES) == EXPECTED
    with pytest.raises(ValueError, match="available"):
        compute_proxy("no_such_proxy", _net(MIXED), torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), 0)


def test_every_proxy_deterministic_node_wise_and_model_untouched(batch) -> None:
    images, labels = batch
    net = _net(MIXED)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = [n for n, _ in node_layers(net)]
    batched = compute_proxies(list(PROXIES), net, images, labels, seed=3)
    for name in PROXIES:
        a = compute_proxy(name, net, images, labels, seed=3)
        b = compute_proxy(name, net, images, labels, seed=3)
        assert a == b, name
        assert a == batched[name], f"{name}: shared passes must not change values"
        assert list(a.node_stats) == names, name
        assert _finite(a), name
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("arch", [ALL_NONE, ALL_SKIP, ALL_POOL])
def test_no_trainable_path_gives_finite_scores(arch: str, batch) -> None:
    images, labels = batch
    results = compute_proxies(list(PROXIES), _net(arch), images, labels, seed=0)
    for name, r in results.items():
        assert _finite(r), (arch, name, r)
    # The cells hold no conv: only stem, reduction blocks and classifier remain as nodes.
    assert len(results["snip"].node_stats) == 1 + 2 * 3 + 1


def test_zen_depends_on_seed_only_through_randomness(batch) -> None:
    images, labels = batch
    net = _net(MIXED)
    assert compute_proxy("zen", net, images, labels, 0) != compute_proxy("zen", net, images, labels, 1)
    # Deterministic proxies ignore the seed.
    assert compute_proxy("snip", net, images, labels, 0) == compute_proxy("snip", net, images, labels, 1)


def test_generic_cnn(batch) -> None:
    images, labels = batch
    model = TinyCNN()
    results = compute_proxies(list(PROXIES), model, images, labels, seed=0)
    for name, r in results.items():
        assert list(r.node_stats) == ["features.0", "features.3", "fc"], name
        assert _finite(r), name
    assert results["params"].node_stats == {"features.0": 8 * 3 * 9 + 8, "features.3": 8 * 4 * 9 + 8, "fc": 90}
    assert results["params"].score == sum(p.numel() for p in model.parameters())
    # MACs per image: 8x8x8 outputs x 27, 4x4x8 outputs x (4 x 9) (groups=2), 10 x 8.
    assert results["flops"].node_stats == {"features.0": 8 * 8 * 8 * 27, "features.3": 4 * 4 * 8 * 36, "fc": 80}
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_proxy_values_agree_with_definitions(batch) -> None:
    images, labels = batch
    net = _net(MIXED)
    ref = _net(MIXED).train()
    loss = nn.functional.cross_entropy(ref(images), labels)
    weights = [m.weight for _, m in node_layers(ref)]
    grads = torch.autograd.grad(loss, weights)
    grad_norm = compute_proxy("grad_norm", net, images, labels, 0)
    snip = compute_proxy("snip", net, images, labels, 0)
    assert grad_norm.score == pytest.approx(sum(float(g.norm()) for g in grads), rel=1e-5)
    assert snip.score == pytest.approx(sum(float((w * g).abs().sum()) for w, g in zip(weights, grads)), rel=1e-5)
    # synflow of a linear model on ones: sum over |W| entries of |W| * (input 1) = sum |W|.
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4, bias=False))
    syn = compute_proxy("synflow", lin, torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long), 0)
    assert syn.score == pytest.approx(float(lin[1].weight.abs().sum()))


def test_bigger_networks_score_higher_on_size_proxies(batch) -> None:
    images, labels = batch
    small, big = _net(ALL_SKIP), _net("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+"
                                      "|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    for name in ("params", "flops", "synflow"):
        assert compute_proxy(name, big, images, labels, 0).score > compute_proxy(name, small, images, labels, 0).score


def test_flops_match_published_nb201_range() -> None:
    # NATS-Bench topology space on CIFAR-10: 7.78 to 220.11 MFLOPs (multiply-accumulates).
    x, y = torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    conv3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
    # By hand: every 3x3 cell edge costs 1024 x 16 x 16 x 9 MACs at each stage (resolution halves
    # as width doubles); stem 32x32x16x27; each reduction 2 convs + 1x1 shortcut; linear 64x10.
    stem, edge, reduction, head = 32 * 32 * 16 * 27, 1024 * 16 * 16 * 9, 256 * 32 * (16 * 9 + 32 * 9 + 16), 640
    big = compute_proxy("flops", build_subnet(NB201Space(), conv3), x, y, 0).score
    small = compute_proxy("flops", build_subnet(NB201Space(), ALL_NONE), x, y, 0).score
    assert big == stem + 3 * 5 * 6 * edge + 2 * reduction + head
    assert small == stem + 2 * reduction + head
    assert round(big / 1e6, 1) == 220.1 and round(small / 1e6, 2) == 7.78
