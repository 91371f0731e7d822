"""Binary-gate (ProxylessNAS) and all-paths (DARTS-style) mixed ops."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_nas.nn.builders import build_supernet
from lightning_nas.nn.mixed_op import (
    AllPathsMixedOp,
    BinaryGateMixedOp,
    ZeroOp,
    rescale_pair_,
    two_path_alpha_grad,
)
from lightning_nas.nn.static import MBConv

pytestmark = pytest.mark.usefixtures("one_thread")


class Scale(nn.Module):
    """A fixed linear op ``c * x`` (no parameters)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


def binary_op(logits: list[float]) -> BinaryGateMixedOp:
    op = BinaryGateMixedOp([Scale(float(i + 1)) for i in range(len(logits))])
    with torch.no_grad():
        op.alpha.copy_(torch.tensor(logits))
    return op


def test_single_path_sampling_frequencies_match_the_softmax() -> None:
    logits = [1.5, 0.0, -1.0, 0.7, -2.0]
    op = binary_op(logits)
    generator = torch.Generator().manual_seed(0)
    n = 10000
    counts = torch.bincount(torch.tensor([op.sample_path(generator) for _ in range(n)]), minlength=5).double()
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    # 4.5 standard errors of a binomial proportion
    assert torch.all((counts / n - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt())
    # uniform sampling (warm-up) ignores the logits
    uniform = torch.bincount(torch.tensor([op.sample_path(generator, uniform=True) for _ in range(n)]), minlength=5)
    assert torch.all((uniform.double() / n - 0.2).abs() < 0.015)


def test_pair_sampling_draws_two_distinct_paths_without_replacement() -> None:
    logits = [1.0, 0.0, -0.5, 0.5]
    op = binary_op(logits)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).tolist()
    generator = torch.Generator().manual_seed(1)
    n = 10000
    pairs: dict[frozenset, int] = {}
    active_given_pair: dict[tuple[int, int], int] = {}
    for _ in range(n):
        active, inactive = op.sample_pair(generator)
        assert active != inactive and op.gates is not None
        assert op.gates.tolist() == [1.0 if i == active else 0.0 for i in range(4)]
        pairs[frozenset((active, inactive))] = pairs.get(frozenset((active, inactive)), 0) + 1
        active_given_pair[(active, inactive)] = active_given_pair.get((active, inactive), 0) + 1
    for i, j in itertools.combinations(range(4), 2):
        # P({i, j}) for two draws without replacement proportional to p
        expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        observed = pairs[frozenset((i, j))] / n
        assert observed == pytest.approx(expected, abs=4.5 * (expected * (1 - expected) / n) ** 0.5)
        # within a pair the active path follows the renormalised probabilities
        total = active_given_pair[(i, j)] + active_given_pair[(j, i)]
        assert active_given_pair[(i, j)] / total == pytest.approx(p[i] / (p[i] + p[j]), abs=0.05)


def test_two_path_forward_is_the_active_path_and_gates_get_inner_products() -> None:
    op = binary_op([0.0, 0.0, 0.0])
    x = torch.randn(4, 3)
    active, inactive = op.sample_pair(torch.Generator().manual_seed(2))
    out = op(x)
    assert torch.allclose(out, (active + 1) * x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    g = op.gate_grad()
    assert g[active] == pytest.approx(float((grad_out * (active + 1) * x).sum()), rel=1e-5)
    assert g[inactive] == pytest.approx(float((grad_out * (inactive + 1) * x).sum()), rel=1e-5)
    assert g[3 - active - inactive] == 0.0  # the third path was masked out
    assert op.alpha.grad is None  # logits only get the estimate that accumulate_arch_grad adds


def test_two_path_gradient_is_the_softmax_gradient_over_the_pair() -> None:
    alpha = torch.tensor([0.3, -1.2, 0.8, 0.1, -0.4])
    pair = (3, 1)
    gate_grad = torch.tensor([0.0, 2.5, 0.0, -1.0, 0.0])
    leaf = alpha.clone().requires_grad_(True)
    q = torch.softmax(leaf[list(pair)], 0)
    (q * gate_grad[list(pair)]).sum().backward()
    estimate = two_path_alpha_grad(alpha, pair, gate_grad)
    assert torch.allclose(estimate, leaf.grad, atol=1e-7)
    assert estimate[[0, 2, 4]].abs().sum() == 0
    assert estimate.sum() == pytest.approx(0.0, abs=1e-7)  # a shift of the pair's logits changes nothing


def test_gradient_estimate_has_the_right_sign_when_one_op_is_clearly_better() -> None:
    """Toy regression: candidate 1 reproduces the target, 0 is zero output, 2 is the negated target."""
    torch.manual_seed(0)
    weight = torch.randn(6, 6)
    good = nn.Linear(6, 6, bias=False)
    bad = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        good.weight.copy_(weight)
        bad.weight.copy_(-weight)
    op = BinaryGateMixedOp([ZeroOp(), good, bad])
    generator = torch.Generator().manual_seed(3)
    total = torch.zeros(3)
    for _ in range(150):
        x = torch.randn(16, 6)
        op.sample_pair(generator)
        op.alpha.grad = None
        loss = ((op(x) - x @ weight.T) ** 2).mean()
        loss.backward()
        op.accumulate_arch_grad()
        total += op.alpha.grad
    assert total[1] < 0  # increase the good op's logit
    assert total[2] > 0  # decrease the clearly worst op's logit
    # and optimising with Adam + rescaling makes the good op the derived one
    optimizer = torch.optim.Adam([op.alpha], lr=0.1, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(120):
        x = torch.randn(16, 6)
        op.sample_pair(generator)
        optimizer.zero_grad(set_to_none=True)
        ((op(x) - x @ weight.T) ** 2).mean().backward()
        op.accumulate_arch_grad()
        optimizer.step()
        op.rescale()
    assert op.argmax() == 1 and op.probs()[1] > 0.8


def test_rescaling_keeps_the_unsampled_paths_probabilities() -> None:
    torch.manual_seed(4)
    op = BinaryGateMixedOp([Scale(float(c)) for c in range(1, 7)])
    with torch.no_grad():
        op.alpha.copy_(torch.randn(6))
    optimizer = torch.optim.Adam([op.alpha], lr=0.3, betas=(0.0, 0.999))
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        before = op.probs().detach().clone()
        active, inactive = op.sample_pair(generator)
        optimizer.zero_grad(set_to_none=True)
        (op(torch.randn(8, 4)) ** 2).mean().backward()
        op.accumulate_arch_grad()
        optimizer.step()
        updated = op.probs().detach().clone()
        op.rescale()
        after = op.probs().detach()
        others = [i for i in range(6) if i not in (active, inactive)]
        assert not torch.allclose(updated[others], before[others], atol=1e-4)  # the update moved them ...
        assert torch.allclose(after[others], before[others], atol=1e-6)  # ... rescaling puts them back
        pair = [active, inactive]
        assert after[pair].sum() == pytest.approx(float(before[pair].sum()), abs=1e-6)
        assert not torch.allclose(after[pair], before[pair])  # the sampled pair did change
    # the helper alone: exp-sum of the pair restored exactly
    alpha, old = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 1.0])
    rescale_pair_(alpha, (0, 2), old)
    assert torch.logsumexp(alpha[[0, 2]], 0) == pytest.approx(float(torch.logsumexp(old[[0, 2]], 0)))
    assert alpha[2] - alpha[0] == pytest.approx(2.0)


def test_all_paths_op_is_the_probability_weighted_sum() -> None:
    op = AllPathsMixedOp([Scale(1.0), Scale(-2.0), ZeroOp()])
    with torch.no_grad():
        op.alpha.copy_(torch.tensor([0.2, -0.3, 1.0]))
    x = torch.randn(3, 5)
    p = op.probs()
    assert torch.allclose(op(x), p[0] * x - 2 * p[1] * x)
    op.fix()
    assert op.active == 2 and op.active_is_zero


def saved_bytes(op: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["binary", "all_paths"])
def test_activation_memory_of_binary_gates_does_not_grow_with_candidates(kind: str) -> None:
    torch.manual_seed(0)
    specs = [(3, 6), (5, 6), (7, 6), (3, 3), (5, 3), (7, 3)]
    x = torch.randn(2, 8, 8, 8)
    memory = {}
    for n in (2, 4, 6):
        candidates = [MBConv(8, 8 * e, 8, kernel_size=k, stride=1, activation="relu") for k, e in specs[:n]]
        op = (BinaryGateMixedOp if kind == "binary" else AllPathsMixedOp)(candidates)
        if kind == "binary":
            op.sample_pair(torch.Generator().manual_seed(0))
            op.pair = (0, 1)  # same two paths at every size, so only the candidate count changes
            op.active = 0
        memory[n] = saved_bytes(op, x)
    if kind == "binary":
        # equal up to the gate vector itself (one float per candidate, saved with the active gate)
        assert memory[6] - memory[2] == 4 * (6 - 2) and memory[4] - memory[2] == 4 * (4 - 2)
    else:
        assert memory[2] < memory[4] < memory[6]
        assert memory[6] > 2 * memory[2]


def test_supernet_starts_shortcut_layers_as_identity_and_extracts_the_chosen_ops() -> None:
    from lightning_nas.spaces.proxyless import ProxylessSpace

    space = ProxylessSpace.from_preset("proxyless_cifar", width_mult=0.25, stage_depths=[1, 2, 1, 1, 1, 1])
    net = build_supernet(space).eval()
    net.fix([1] * space.num_layers)
    for block, layer in zip(net.blocks, space.layers):
        h = torch.randn(2, layer.in_channels, 8, 8)
        if layer.shortcut:  # zero-initialised residual branch
            assert torch.equal(block(h), h)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ops = [layer.candidates[-1] for layer in space.layers]  # 'zero' where allowed, else 7x7_MBConv6
    net.fix([len(layer.candidates) - 1 for layer in space.layers])
    derived = net.extract(ops).eval()
    assert derived.ops == ops and not isinstance(derived.blocks[2], MBConv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(derived(x), net(x), atol=1e-5)
