from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_nas.nn.quant import (
    ActivationQuantizer,
    WeightQuantizer,
    check_bits,
    fake_quantize,
)
from lightning_nas.nn.quantize_model import (
    attach_bias_grids,
    attach_quantizers,
    calibrate_activation_ranges,
    freeze_batchnorm,
    get_bits,
    has_bias_grids,
    quantized_layers,
    remove_quantizers,
    set_bits,
)


class ElasticLinear(nn.Module):
    """Stand-in for an elastic supernet layer: applies its own quantizers (the agreed protocol)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.active_out = cout
        self.weight_quantizer = None
        self.input_quantizer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight[: self.active_out, : x.shape[-1]]
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x @ weight.t()


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _levels_per_channel(weight: torch.Tensor) -> int:
    return max(int(torch.unique(row).numel()) for row in weight.detach().reshape(weight.shape[0], -1))


# ---------------------------------------------------------------- functional core


def test_fake_quantize_keeps_grid_values_and_bounds_error() -> None:
    scale = torch.tensor(0.05)
    on_grid = torch.arange(-127, 128, dtype=torch.float32) * scale
    assert torch.equal(fake_quantize(on_grid, scale, -127, 127), on_grid)
    x = torch.empty(10_000).uniform_(-127 * 0.05, 127 * 0.05)
    err = (fake_quantize(x, scale, -127, 127) - x).abs()
    assert float(err.max()) <= 0.05 / 2 + 1e-6


def test_fake_quantize_clamps_and_routes_gradients() -> None:
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 5.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, scale, -2, 2)
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    y.sum().backward()
    # straight through inside the range, zero outside (clamped)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # d y / d scale: qmin / qmax outside, round(x/s) - x/s inside
    expected = -2 + (-1 + 0.52) + (0 - 0.2) + (1 - 1.48) + 2
    assert float(scale.grad) == pytest.approx(expected, abs=1e-5)


def test_check_bits_messages() -> None:
    assert check_bits(None) is None and check_bits(32) is None and check_bits(4) == 4
    for bad in (1, 9, 16, 4.0, True):
        with pytest.raises(ValueError, match=r"bit width must be an int in \[2, 8\]"):
            check_bits(bad)


# ---------------------------------------------------------------- weight quantizer


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_weight_quantizer_round_trip_and_levels(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    q = WeightQuantizer(bits)
    wq = q(w)
    # idempotent: values already on the grid do not move
    assert torch.allclose(q(wq), wq, atol=1e-7)
    # each channel: error at most half a step, at most 2^b - 1 levels, extremes preserved
    step = q.scale(w)
    assert bool(((wq - w).abs() <= step / 2 + 1e-7).all())
    assert _levels_per_channel(wq) <= 2**bits - 1
    assert torch.allclose(wq.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)))


def test_weight_quantizer_full_precision_and_ste() -> None:
    w = torch.randn(4, 5, requires_grad=True)
    assert WeightQuantizer(None)(w) is w
    assert WeightQuantizer(32)(w) is w
    q = WeightQuantizer(4)
    upstream = torch.randn(4, 5)
    (q(w) * upstream).sum().backward()
    assert torch.allclose(w.grad, upstream)
    with pytest.raises(ValueError, match="got 12"):
        q.bits = 12


# ---------------------------------------------------------------- activation quantizer


def test_activation_quantizer_unsigned_and_signed() -> None:
    x = torch.linspace(-2, 2, 101)
    unsigned = ActivationQuantizer(8, signed=False, init_alpha=1.0)
    y = unsigned(x)
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.0)
    inside = (x >= 0) & (x <= 1)
    assert float((y - x)[inside].abs().max()) <= 1.0 / 255 / 2 + 1e-6
    signed = ActivationQuantizer(4, signed=True, init_alpha=1.5)
    y = signed(x)
    # the codes of an int8 tensor with zero point 128, at 4 bits: -8..7 steps of alpha / 7
    assert float(y.min()) == pytest.approx(-1.5 * 8 / 7) and float(y.max()) == pytest.approx(1.5)
    assert torch.unique(y).numel() == 16


def test_quantizer_rounds_like_the_int8_kernels() -> None:
    """Sums of two grids are full of exact .5 ties that x / s and x * (1 / s) round apart;
    torch.quantize_per_tensor multiplies by the inverse, and so must training."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-200, 200, (200_000,), generator=generator).float() * 0.0211
    b = torch.randint(-200, 200, (200_000,), generator=generator).float() * 0.0173
    x = a + b
    quantizer = ActivationQuantizer(8, signed=True, init_alpha=0.037 * 127)
    step = float(quantizer.scale())
    kernel = torch.quantize_per_tensor(x, step, 128, torch.quint8).dequantize()
    assert torch.equal(quantizer(x), kernel)
    assert int((torch.clamp(torch.round(x / quantizer.scale()), -128, 127) * step != kernel).sum()) > 0


def test_activation_quantizer_pact_gradient_reaches_alpha() -> None:
    q = ActivationQuantizer(8, signed=False, init_alpha=1.0, lsq_grad_scale=False)
    x = torch.full((10,), 3.0, requires_grad=True)  # every element clipped
    q(x).sum().backward()
    assert float(q.alpha.grad) == pytest.approx(10.0)  # PACT: d/d alpha = 1 per clipped element
    assert float(x.grad.abs().sum()) == 0.0

    scaled = ActivationQuantizer(8, signed=False, init_alpha=1.0)
    x = torch.rand(4, 3, 8, 8, requires_grad=True) * 2
    x.retain_grad()
    scaled(x).sum().backward()
    assert scaled.alpha.grad is not None and float(scaled.alpha.grad) > 0
    assert float(x.grad.abs().sum()) > 0


def test_activation_quantizer_lazy_init_and_checkpoint() -> None:
    q = ActivationQuantizer(8)
    assert not bool(q.initialized)
    q(torch.tensor([-0.5, 0.25, 2.0]))
    assert bool(q.initialized) and q.signed is True
    assert float(q.alpha) == pytest.approx(2.0, rel=1e-3)
    fresh = ActivationQuantizer(8)
    fresh.load_state_dict(q.state_dict())
    assert fresh.signed is True and float(fresh.alpha) == float(q.alpha)
    fresh(torch.full((3,), 100.0))  # a loaded range must not be re-initialised
    assert float(fresh.alpha) == pytest.approx(2.0, rel=1e-3)


# ---------------------------------------------------------------- attaching to models


def test_policy_change_at_run_time_changes_bits_used() -> None:
    torch.manual_seed(0)
    model = Small()
    attach_quantizers(model, {"conv": (8, 8), "fc": (8, 8)})
    w8 = model.conv.weight.detach().clone()
    quantizers = quantized_layers(model)["conv"]
    attach_quantizers(model, {"conv": (2, 8)})  # second call: same objects, new bits
    assert quantized_layers(model)["conv"][0] is quantizers[0]
    assert _levels_per_channel(model.conv.weight) <= 3 < _levels_per_channel(w8)
    set_bits(model, {"conv": (None, None)})
    assert get_bits(model)["conv"] == (None, None)
    assert _levels_per_channel(model.conv.weight) == 27  # float again: every weight distinct

    x = torch.randn(2, 3, 8, 8)
    set_bits(model, {"conv": (8, 2)})
    y2 = model(x)
    set_bits(model, {"conv": (8, 8)})
    assert not torch.allclose(model(x), y2)


def test_elastic_protocol_layers_get_attributes() -> None:
    layer = ElasticLinear(6, 5)
    model = nn.Sequential(layer)
    attach_quantizers(model, {"0": (4, 8)})
    assert isinstance(layer.weight_quantizer, WeightQuantizer)
    assert isinstance(layer.input_quantizer, ActivationQuantizer)
    assert "0.input_quantizer.alpha" in model.state_dict()
    layer.active_out = 3  # a smaller subnet: per-channel scales follow the active weight
    out = model(torch.randn(2, 6))
    assert out.shape == (2, 3)
    assert _levels_per_channel(layer.weight_quantizer(layer.weight)) <= 15
    set_bits(model, {"0": (2, 8)})
    assert _levels_per_channel(layer.weight_quantizer(layer.weight)) <= 3
    assert remove_quantizers(model) == ["0"]
    assert layer.weight_quantizer is None and layer.input_quantizer is None


def test_attach_rejects_bad_names_and_bits_without_side_effects() -> None:
    model = Small()
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        attach_quantizers(model, {"conv": (8, 8), "nope": (8, 8)})
    with pytest.raises(TypeError, match="layer 'bn' is a BatchNorm2d"):
        attach_quantizers(model, {"bn": (8, 8)})
    with pytest.raises(ValueError, match="got 3.5"):
        attach_quantizers(model, {"conv": (3.5, 8)})
    assert quantized_layers(model) == {}
    with pytest.raises(KeyError, match="call attach_quantizers first"):
        set_bits(model, {"conv": (4, 4)})


def test_remove_restores_float_weights_and_survives_deepcopy() -> None:
    model = Small()
    original = model.conv.weight.detach().clone()
    attach_quantizers(model, {"conv": (4, 4), "fc": (4, 4)})
    clone = copy.deepcopy(model)
    assert sorted(remove_quantizers(clone)) == ["conv", "fc"]
    assert type(clone.conv) is nn.Conv2d and torch.equal(clone.conv.weight, original)
    assert not clone.conv._forward_pre_hooks
    # the source keeps working after its copy was stripped (shared parametrized class)
    model(torch.randn(1, 3, 8, 8))
    assert _levels_per_channel(model.conv.weight) <= 15


def test_calibration_sets_sign_and_range() -> None:
    torch.manual_seed(0)
    model = Small().eval()
    attach_quantizers(model, {"conv": (8, 8), "fc": (8, 8)})
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    ranges = calibrate_activation_ranges(model, [(b, torch.zeros(8)) for b in batches], percentile=100)
    assert ranges["conv"][1] is True  # normalised images go negative
    assert ranges["fc"][1] is False  # pooled ReLU output does not
    expected = sum(float(b.abs().max()) for b in batches) / 3
    assert ranges["conv"][0] == pytest.approx(expected, rel=1e-5)
    assert get_bits(model) == {"conv": (8, 8), "fc": (8, 8)}  # bits restored after observing


def test_freeze_batchnorm_survives_train_mode() -> None:
    model = Small()
    assert freeze_batchnorm(model) == 1
    model.train()
    before = model.bn.running_mean.clone()
    model(torch.randn(4, 3, 8, 8) + 3)
    assert torch.equal(model.bn.running_mean, before)
    freeze_batchnorm(model, frozen=False)
    model.train()
    model(torch.randn(4, 3, 8, 8) + 3)
    assert not torch.equal(model.bn.running_mean, before)


def _calibrate_on_rank(rank: int, world: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        model = Small().eval()  # same weights on every rank
        attach_quantizers(model, {"conv": (8, 8), "fc": (8, 8)})
        torch.manual_seed(100 + rank)  # different data on every rank
        data = [torch.randn(4, 3, 8, 8) * (1 + rank)]
        ranges = calibrate_activation_ranges(model, data, percentile=100)
        torch.save(ranges, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~30 s on a shared 2-core machine
def test_calibration_agrees_across_ddp_ranks(tmp_path) -> None:  # noqa: ANN001
    import torch.multiprocessing as mp

    mp.spawn(_calibrate_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "ranges")), nprocs=2)
    first, second = (torch.load(tmp_path / f"ranges.{r}") for r in range(2))
    assert first == second


def _conv_bn_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        bn = model[1]
        bn.weight.copy_(torch.tensor([-1.5, -0.7, -0.2, 0.4, 0.9, 1.3, 1.7, 2.0]))  # a negative gain flips the folded grid's sign
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    attach_quantizers(model, {"0": (8, 8)})
    images = torch.randn(16, 3, 6, 6)
    calibrate_activation_ranges(model.eval(), [images])
    return model, images


def _folded_bias_in_steps(model: nn.Module) -> torch.Tensor:
    """The bias the batch norm output holds (a zero input gives a zero accumulator), in grid steps."""
    conv, bn = model[0], model[1]
    seen = []
    handle = bn.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, 6, 6))
    handle.remove()
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wq = conv.parametrizations.weight[0]
    step = conv.input_quantizer.scale() * wq.scale(conv.parametrizations.weight.original).flatten() * gain.abs()
    return (seen[0][0, :, 2, 2] / step).detach()


def test_bias_grid_puts_folded_bias_on_int32_grid() -> None:
    model, _ = _conv_bn_model()
    without = copy.deepcopy(model)
    before = _folded_bias_in_steps(model)
    assert (before - before.round()).abs().max() > 0.05  # the float bias is off the grid
    assert attach_bias_grids(model) == ["1"]  # the hook sits on the batch norm after the conv
    assert attach_bias_grids(model) == [] and has_bias_grids(model)
    after = _folded_bias_in_steps(model)
    torch.testing.assert_close(after, before.round(), atol=1e-3, rtol=0)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert not torch.equal(model(x), without(x))
        model[1].train()  # batch statistics: no folded bias to round
        without[1].train()
        torch.testing.assert_close(model(x), without(x), atol=0, rtol=0)
    remove_quantizers(model)
    assert not has_bias_grids(model) and "_bias_grid_layer" not in model[1].__dict__
