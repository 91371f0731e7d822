"""Dynamic layers: slicing, kernel transformation, fast paths and the quantization hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nas.nn.elastic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicLinear,
    DynamicSqueezeExcite,
    depthwise_conv2d,
    pointwise_conv2d,
)
from lightning_nas.nn.static import SqueezeExcite

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(fn, *tensors: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, list(torch.autograd.grad(out, tensors, grad))


def test_kernel_transform_at_init_is_centre_crop() -> None:
    conv = DynamicDepthwiseConv2d(16, [3, 5, 7], stride=1)
    w7 = conv.weight.detach()
    assert torch.equal(conv.active_weight(16, 7), conv.weight)
    assert torch.equal(conv.active_weight(16, 5), w7[:, :, 1:6, 1:6])
    assert torch.equal(conv.active_weight(16, 3), w7[:, :, 2:5, 2:5])
    assert torch.equal(conv.active_weight(8, 3), w7[:8, :, 2:5, 2:5])
    assert [tuple(p.shape) for p in conv.kernel_transforms()] == [(9, 9), (25, 25)]


def test_kernel_transform_chain_7_to_5_to_3() -> None:
    torch.manual_seed(0)
    conv = DynamicDepthwiseConv2d(6, [3, 5, 7])
    with torch.no_grad():
        for p in conv.kernel_transforms():
            p.add_(0.1 * torch.randn_like(p))
    w = conv.weight.detach()
    m53, m75 = (p.detach() for p in conv.kernel_transforms())
    # independent reference: taps as row vectors, y = M @ taps
    k5 = (m75 @ w[:, 0, 1:6, 1:6].reshape(6, 25).T).T.reshape(6, 1, 5, 5)
    k3 = (m53 @ k5[:, 0, 1:4, 1:4].reshape(6, 9).T).T.reshape(6, 1, 3, 3)
    torch.testing.assert_close(conv.active_weight(6, 5), k5)
    torch.testing.assert_close(conv.active_weight(6, 3), k3)
    conv.active_kernel_size = 3
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, k3[:4], None, 1, 1, 1, 4))
    conv(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.kernel_transforms())
    with pytest.raises(ValueError, match="kernel size 4"):
        conv.active_weight(6, 4)


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride", "channels_last"),
    [
        (8, 8, 7, 1, True),  # matrix form (8x8, 7x7)
        (8, 4, 5, 2, False),  # matrix form, stride 2, NCHW
        (8, 2, 7, 1, True),  # kernel cropped to 3x3, matrix form
        (8, 1, 7, 2, False),  # 1x1 map: per-channel scale
        (8, 5, 3, 2, True),  # oneDNN path
        (8, 16, 5, 1, False),  # oneDNN path
    ],
)
def test_depthwise_fast_paths_match_conv2d(channels, size, kernel, stride, channels_last) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, channels, size, size + 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(channels, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _grads(lambda: F.conv2d(x, w, None, stride, kernel // 2, 1, channels), x, w)
    out, grads = _grads(lambda: depthwise_conv2d(x, w, stride), x, w)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_depthwise_matrix_form_trains_under_bf16_autocast() -> None:
    """Under ``trainer.precision=bf16-mixed`` the matrix form gets a bf16 input and a float32 weight;
    it runs in float32 and hands back gradients in each operand's own dtype."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(x, w, 1)
    out.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = F.conv2d(x.detach().float(), w.detach(), None, 1, 3, 1, 8)
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.05)
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize(("size", "channels_last"), [(1, False), (4, True), (8, True)])
def test_pointwise_matmul_matches_conv2d(size: int, channels_last: bool) -> None:
    x = torch.randn(4, 12, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(20, 12, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _grads(lambda: F.conv2d(x, w, b), x, w, b)
    out, grads = _grads(lambda: pointwise_conv2d(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dynamic_conv_slices_in_and_out_channels(channels_last: bool) -> None:
    conv = DynamicConv2d(16, 24, kernel_size=1, bias=True)
    conv.active_out_channels = 10
    for size in (1, 4, 9):
        x = torch.randn(2, 12, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        expected = F.conv2d(x, conv.weight[:10, :12], conv.bias[:10])
        torch.testing.assert_close(conv(x), expected)
    stem = DynamicConv2d(3, 16, kernel_size=3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(stem(x), F.conv2d(x, stem.weight, None, 2, 1))
    assert stem.active_weight(3) is stem.weight  # full width: no copy


def test_dynamic_batchnorm_slices_statistics_and_affine() -> None:
    torch.manual_seed(2)
    bn = DynamicBatchNorm2d(12, momentum=0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    ref = nn.BatchNorm2d(7, momentum=0.5)
    ref.load_state_dict(
        {
            "weight": bn.weight[:7],
            "bias": bn.bias[:7],
            "running_mean": bn.running_mean[:7],
            "running_var": bn.running_var[:7],
            "num_batches_tracked": bn.num_batches_tracked,
        }
    )
    x = torch.randn(5, 7, 3, 3) * 3 + 1
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean[:7], ref.running_mean)
    torch.testing.assert_close(bn.running_var[:7], ref.running_var)
    assert torch.equal(bn.running_mean[7:], torch.zeros(5)) and torch.equal(bn.running_var[7:], torch.ones(5))
    bn.eval()
    ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    # cumulative average mode (momentum=None), as used by recalibration
    bn.train()
    ref.train()
    bn.momentum, ref.momentum = None, None
    bn.reset_running_stats()
    ref.reset_running_stats()
    for _ in range(3):
        x = torch.randn(5, 7, 3, 3)
        bn(x)
        ref(x)
    torch.testing.assert_close(bn.running_mean[:7], ref.running_mean)
    torch.testing.assert_close(bn.running_var[:7], ref.running_var)
    assert isinstance(bn, nn.BatchNorm2d)


def test_dynamic_linear_slices() -> None:
    lin = DynamicLinear(32, 10)
    lin.active_out_features = 6
    x = torch.randn(3, 20)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight[:6, :20], lin.bias[:6]))


def test_dynamic_se_equals_static_se_with_sliced_weights() -> None:
    torch.manual_seed(3)
    se = DynamicSqueezeExcite(96, reduction=4)
    with torch.no_grad():
        for p in se.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 64, 5, 5)
    hidden = se.hidden_channels(64)
    assert hidden == 16
    static = SqueezeExcite(64, hidden)
    with torch.no_grad():
        static.reduce.weight.copy_(se.reduce.weight[:hidden, :64])
        static.reduce.bias.copy_(se.reduce.bias[:hidden])
        static.expand.weight.copy_(se.expand.weight[:64, :hidden])
        static.expand.bias.copy_(se.expand.bias[:64])
    torch.testing.assert_close(se(x), static(x))


class _Recorder(nn.Module):
    """A stand-in quantizer: records what it sees and scales it (with a buffer to move)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(t.shape))
        return t * self.scale


def test_quantizer_hooks_see_active_weight_and_input() -> None:
    conv = DynamicDepthwiseConv2d(16, [3, 5, 7])
    assert conv.weight_quantizer is None and conv.input_quantizer is None
    assert [n for n, _ in conv.named_modules()] == [""]
    conv.active_kernel_size = 5
    x = torch.randn(2, 12, 6, 6)
    plain = conv(x)
    conv.weight_quantizer = _Recorder(2.0)
    conv.input_quantizer = _Recorder(3.0)
    assert {n for n, _ in conv.named_modules()} == {"", "weight_quantizer", "input_quantizer"}
    torch.testing.assert_close(conv(x), 6 * plain)
    assert conv.weight_quantizer.seen == [(12, 1, 5, 5)]  # sliced and transformed, before any crop
    assert conv.input_quantizer.seen == [(2, 12, 6, 6)]
    conv.to(torch.float64)
    assert conv.weight_quantizer.scale.dtype == torch.float64
    conv.weight_quantizer = None
    conv.input_quantizer = None
    conv.to(torch.float32)
    torch.testing.assert_close(conv(x), plain)
    assert [n for n, _ in conv.named_modules()] == [""]

    conv1x1 = DynamicConv2d(8, 16, 1)
    conv1x1.active_out_channels = 12
    conv1x1.weight_quantizer = _Recorder(0.5)
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(conv1x1(x), F.conv2d(x, 0.5 * conv1x1.weight[:12, :6]))
    assert conv1x1.weight_quantizer.seen == [(12, 6, 1, 1)]

    linear = DynamicLinear(8, 4)
    linear.weight_quantizer = _Recorder(0.5)
    linear.input_quantizer = _Recorder(2.0)
    x = torch.randn(2, 8)
    torch.testing.assert_close(linear(x), F.linear(2 * x, 0.5 * linear.weight, linear.bias))
    assert linear.weight_quantizer.seen == [(4, 8)]
