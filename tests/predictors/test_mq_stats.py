from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nas.nn.ptq import clipped_quantize
from lightning_nas.predictors.mq_stats import compute_layer_statistics, hutchinson, orthogonality
from lightning_nas.spaces.emq_programs import bitops_table, hand_made_table

BITS = (2, 3, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hutchinson_is_exact_on_a_diagonal_quadratic() -> None:
    # Rademacher v: v_i^2 = 1, so v * (A v) is exactly diag(A) for a diagonal A, whatever the draw.
    a = torch.tensor([1.0, -2.0, 3.5, 0.25], dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    traces, diagonals = hutchinson(lambda: 0.5 * (a * w * w).sum(), [w], 1, torch.Generator().manual_seed(0))
    assert traces[0] == pytest.approx(float(a.sum()))
    torch.testing.assert_close(diagonals[0], a)


def test_hutchinson_trace_of_a_dense_quadratic_converges_to_the_exact_trace() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T / 12 + torch.eye(12, dtype=torch.float64)
    w1 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        w = torch.cat([w1, w2])
        return 0.5 * w @ a @ w

    traces, diagonals = hutchinson(loss, [w1, w2], 3000, g)
    exact = torch.diagonal(a)
    # standard error of one block's estimate: sqrt(2 * sum_{i != j in block} a_ij^2 / samples) < 0.05
    assert traces[0] == pytest.approx(float(exact[:5].sum()), abs=0.2)
    assert traces[1] == pytest.approx(float(exact[5:].sum()), abs=0.2)
    torch.testing.assert_close(torch.cat(diagonals), exact, atol=0.1, rtol=0)


def test_orthogonality_matches_the_feature_space_formula() -> None:
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(6, 4, generator=g), torch.randn(6, 2, 3, generator=g), torch.randn(6, 5, generator=g)]
    orth = orthogonality(features)
    xs = [f.reshape(6, -1).double().numpy() for f in features]
    for i, xi in enumerate(xs):
        for j, xj in enumerate(xs):
            expected = np.linalg.norm(xj.T @ xi) ** 2 / (np.linalg.norm(xi.T @ xi) * np.linalg.norm(xj.T @ xj))
            assert orth[i, j] == pytest.approx(expected, rel=1e-9)
    assert np.diag(orth) == pytest.approx(np.ones(3))


def test_clipped_quantize_chooses_the_least_error_clip_per_channel() -> None:
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    ratios = [0.25, 0.5, 0.75, 1.0]
    for bits in BITS:
        q, chosen = clipped_quantize(w, bits, ratios)
        qmax = 2 ** (bits - 1) - 1
        flat, qflat = w.reshape(5, -1).numpy(), q.reshape(5, -1).numpy()
        for c in range(5):
            errors = []
            for r in ratios:
                scale = r * np.abs(flat[c]).max() / qmax
                errors.append(((flat[c] - np.clip(np.round(flat[c] / scale), -qmax, qmax) * scale) ** 2).sum())
            assert float(chosen[c]) == ratios[int(np.argmin(errors))]
            assert ((flat[c] - qflat[c]) ** 2).sum() == pytest.approx(min(errors), rel=1e-5)
            codes = qflat[c] / (float(chosen[c]) * np.abs(flat[c]).max() / qmax)
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    # Gaussian channels at 2 bits (ternary): the max-abs scale zeroes too much, a lower clip wins
    assert (clipped_quantize(w, 2, ratios)[1] < 1.0).all()


class Tiny(nn.Module):
    """conv(3 -> 4, 3x3, pad 1) -> ReLU -> global pool -> linear(4 -> 3), no batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_layer_statistics_of_a_tiny_network_match_hand_computations() -> None:
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(5, 3, 6, 6, generator=g), torch.tensor([0, 1, 2, 0, 1])
    stats = compute_layer_statistics(model, ["conv", "fc"], images, labels, BITS, hessian_samples=1,
                                     activation_images=2, seed=0)
    conv_w, fc_w = model.conv.weight.detach(), model.fc.weight.detach()
    assert stats.names == ["conv", "fc"] and stats.bit_choices == BITS
    np.testing.assert_allclose(stats.tensors[0]["weight"], conv_w.reshape(4, 27).numpy(), rtol=1e-6)

    # gradient of the classifier by hand: dL/dW = (softmax(z) - onehot)^T h / N
    h = model.pool(model.relu(model.conv(images))).flatten(1).detach()
    p = F.softmax(h @ fc_w.T, dim=1)
    hand_grad = (p - F.one_hot(labels, 3).float()).T @ h / 5
    np.testing.assert_allclose(stats.tensors[1]["grad"], hand_grad.numpy(), rtol=1e-4, atol=1e-7)
    # activations: the layer's input on the first 2 images, channels x positions
    np.testing.assert_allclose(stats.tensors[0]["act"], images[:2].transpose(0, 1).reshape(3, -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.tensors[1]["act"], h[:2].T.numpy(), rtol=1e-5)
    # perturbation per bit width with the benchmark's quantizer
    for j, bits in enumerate(BITS):
        q = clipped_quantize(fc_w, bits)[0]
        np.testing.assert_allclose(stats.tensors[1]["perturb"][j], (fc_w - q).numpy(), atol=1e-7)
        np.testing.assert_allclose(stats.tensors[1]["qweight"][j], q.numpy(), atol=1e-7)
    # counts: parameters and MACs of one 6x6 image
    np.testing.assert_array_equal(stats.scalars["params"], [108.0, 12.0])
    np.testing.assert_array_equal(stats.scalars["macs"], [6 * 6 * 4 * 27, 12])
    np.testing.assert_allclose(bitops_table(stats), np.array([[6 * 6 * 4 * 27], [12]]) * np.array([BITS, BITS]) * 8)
    # the exact Hessian of the loss in both layers' weights (120 x 120), against the one Hutchinson
    # draw: the classifier's estimate is v_fc . (H v)_fc for the drawn v, recomputed here by hand
    def loss(conv_weight: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
        features = model.pool(F.relu(F.conv2d(images, conv_weight, padding=1))).flatten(1)
        return F.cross_entropy(features @ fc_weight.T, labels)

    blocks = torch.autograd.functional.hessian(loss, (conv_w, fc_w))
    generator = torch.Generator().manual_seed(0)
    v_conv = (torch.randint(0, 2, conv_w.shape, generator=generator, dtype=torch.int64) * 2 - 1).float()
    v_fc = (torch.randint(0, 2, fc_w.shape, generator=generator, dtype=torch.int64) * 2 - 1).float()
    hv_fc = (blocks[1][0].reshape(12, 108) @ v_conv.reshape(-1) + blocks[1][1].reshape(12, 12) @ v_fc.reshape(-1))
    assert stats.scalars["hessian_trace"][1] == pytest.approx(float(v_fc.reshape(-1) @ hv_fc), rel=1e-4)
    np.testing.assert_allclose(stats.tensors[1]["hessian"].reshape(-1), (v_fc.reshape(-1) * hv_fc).numpy(),
                               rtol=1e-4, atol=1e-7)
    # bit-weighted SNIP: sum |w * dL/dw| per layer (no batch norm: train and eval mode agree), times bits
    snip_fc = float((fc_w * hand_grad).abs().sum())
    assert stats.scalars["snip"][1] == pytest.approx(snip_fc, rel=1e-4)
    np.testing.assert_allclose(hand_made_table("snip", stats)[1], snip_fc * np.array(BITS), rtol=1e-4)
    # bit-weighted grad-norm: ||dL/dW||_F per layer, times bits; fisher and synflow weighted the same way
    assert stats.scalars["grad_norm"][1] == pytest.approx(float(hand_grad.norm()), rel=1e-4)
    np.testing.assert_allclose(hand_made_table("grad_norm", stats)[1], float(hand_grad.norm()) * np.array(BITS),
                               rtol=1e-4)
    for proxy in ("fisher", "synflow"):
        np.testing.assert_allclose(hand_made_table(proxy, stats), stats.scalars[proxy][:, None] * np.array([BITS, BITS]))
    # HAWQ: trace / n * ||W - Q_b(W)||^2
    perturbation = np.array([((fc_w - clipped_quantize(fc_w, b)[0]) ** 2).sum().item() for b in BITS])
    np.testing.assert_allclose(-hand_made_table("hawq_v3", stats)[1],
                               stats.scalars["hessian_trace"][1] / 12 * perturbation, rtol=1e-5)
    # OMPQ: gamma = summed orthogonality of the layer outputs with the other layers'
    outputs = [model.conv(images).detach(), (h @ fc_w.T).detach()]
    orth = orthogonality(outputs)
    np.testing.assert_allclose(stats.scalars["ompq_gamma"], [orth[0, 1], orth[1, 0]], rtol=1e-6)
    assert stats.tensors[0]["hessian"].shape == (4, 27)


def test_statistics_of_an_ofa_subnet_with_depthwise_se_and_h_swish() -> None:
    from conftest import tiny_ofa_subnet

    model = tiny_ofa_subnet()
    layers = model.block_layers()
    g = torch.Generator().manual_seed(4)
    images, labels = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
    stats = compute_layer_statistics(model, layers, images, labels, BITS, hessian_samples=2, activation_images=2)
    assert stats.names == layers
    for name, tensors in zip(layers, stats.tensors):
        for key, value in tensors.items():
            for array in value if isinstance(value, list) else [value]:
                assert np.isfinite(array).all(), (name, key)
    for key, values in stats.scalars.items():
        assert values.shape == (len(layers),) and np.isfinite(values).all(), key
    assert (stats.scalars["snip"] > 0).all() and (stats.scalars["grad_norm"] > 0).all()
    for table in ("hawq_v3", "ompq", "snip", "fisher", "synflow", "grad_norm", "bitops", "size"):
        assert np.isfinite(hand_made_table(table, stats)).all(), table
    # shapes and counts of a depthwise conv (one 3x3 filter per channel, 4x4 maps in stage 3) and
    # of the SE convs (1x1 on the pooled map)
    dw, reduce = layers.index("blocks.6.dw.conv"), layers.index("blocks.6.se.reduce")
    channels = model.get_submodule("blocks.6.dw.conv").in_channels
    hidden = model.get_submodule("blocks.6.se.reduce").out_channels
    assert stats.tensors[dw]["weight"].shape == (channels, 9)
    assert stats.tensors[dw]["act"].shape[0] == channels
    side = int(round((stats.tensors[dw]["act"].shape[1] / 2) ** 0.5))  # input side: stride 2 or not
    out_side = side // model.get_submodule("blocks.6.dw.conv").stride[0]
    assert stats.scalars["macs"][dw] == out_side * out_side * channels * 9
    assert stats.scalars["macs"][reduce] == hidden * channels and stats.tensors[reduce]["act"].shape == (channels, 2)
    assert stats.scalars["params"][dw] == channels * 9
    # OMPQ: the Gram matrices are positive semi-definite, so each orthogonality is in [0, 1]
    assert ((stats.scalars["ompq_gamma"] >= 0) & (stats.scalars["ompq_gamma"] <= len(layers) - 1)).all()


def test_hutchinson_through_depthwise_se_and_h_swish_matches_finite_differences() -> None:
    # In float64, the one-draw estimate v_l . (H v)_l against central differences of the gradient
    # along v: independent of double backward through hard-swish, hard-sigmoid and grouped convs.
    import copy

    from conftest import tiny_ofa_subnet

    model = tiny_ofa_subnet().double()
    names = ["blocks.6.dw.conv", "blocks.6.se.reduce", "blocks.6.se.expand", "blocks.8.expand.conv"]
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,), generator=g)
    stats = compute_layer_statistics(model, names, images, labels, BITS, hessian_samples=1, activation_images=1,
                                     seed=0, zero_cost=())
    network = copy.deepcopy(model)
    for m in network.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    weights = [network.get_submodule(n).weight for n in names]
    generator = torch.Generator().manual_seed(0)
    vs = [(torch.randint(0, 2, w.shape, generator=generator, dtype=torch.int64) * 2 - 1).double() for w in weights]

    def grads() -> list[torch.Tensor]:
        return list(torch.autograd.grad(F.cross_entropy(network(images), labels), weights))

    eps = 1e-5
    with torch.no_grad():
        for w, v in zip(weights, vs):
            w.add_(eps * v)
    plus = grads()
    with torch.no_grad():
        for w, v in zip(weights, vs):
            w.sub_(2 * eps * v)
    minus = grads()
    for i, v in enumerate(vs):
        hv = (plus[i] - minus[i]) / (2 * eps)
        assert stats.scalars["hessian_trace"][i] == pytest.approx(float((v * hv).sum()), rel=1e-4, abs=1e-9)
        np.testing.assert_allclose(stats.tensors[i]["hessian"].reshape(-1), (v * hv).reshape(-1).numpy(),
                                   rtol=1e-3, atol=1e-8)
