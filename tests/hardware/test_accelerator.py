from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from lightning_nas.hardware.accelerator import BitFusionModel
from lightning_nas.spaces.layers import LayerSpec

BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)


def conv(cin: int, cout: int, k: int = 1, size: int = 16, stride: int = 1, groups: int = 1) -> LayerSpec:
    out = (size + 2 * (k // 2) - k) // stride + 1
    return LayerSpec("layer", "conv", cin, cout, k, stride, groups, size, out, False, role="pw_expand", block=0)


def random_layers(n: int, seed: int = 0) -> list[LayerSpec]:
    rng = random.Random(seed)
    layers = []
    for _ in range(n):
        cin = rng.choice([8, 16, 24, 40, 96, 240, 480])
        if rng.random() < 0.3:  # depthwise
            layers.append(conv(cin, cin, rng.choice([3, 5, 7]), rng.choice([2, 4, 8, 16, 56]), groups=cin))
        else:
            layers.append(conv(cin, rng.choice([16, 24, 80, 160, 960]), rng.choice([1, 1, 3]), rng.choice([1, 4, 14, 28])))
    return layers


def test_bricks_follow_bitfusion_fusion() -> None:
    model = BitFusionModel()
    assert model.bricks(8, 8) == 16  # one 8x8 multiply fills a 16-brick fusion unit
    assert model.bricks(4, 4) == 4  # four 4x4 multiplies per unit
    assert model.bricks(8, 4) == 8
    assert model.bricks(2, 2) == 1
    assert model.bricks(6, 6) == 9  # 6 bits round up to 3 bricks per operand
    assert model.bricks(32, 32) == 256


def test_costs_are_monotone_in_weight_and_activation_bits() -> None:
    model = BitFusionModel()
    layers = random_layers(40)
    for w, a in itertools.product(BITS, BITS):
        base = model.layer_costs(layers, [w] * len(layers), [a] * len(layers))
        for w2, a2 in ((w, a), (min(32, w * 2), a), (w, min(32, a * 2)), (min(32, w + 1), min(32, a + 1))):
            more = model.layer_costs(layers, [w2] * len(layers), [a2] * len(layers))
            assert np.all(more["latency_ms"] >= base["latency_ms"] - 1e-15)
            assert np.all(more["energy_mj"] >= base["energy_mj"] - 1e-15)
            if (w2, a2) != (w, a):  # more bits always cost energy (arithmetic and traffic grow)
                assert np.all(more["energy_mj"] > base["energy_mj"])


@pytest.mark.parametrize("grow", ["cin", "cout", "size", "kernel"])
def test_costs_are_monotone_in_macs(grow: str) -> None:
    model = BitFusionModel()
    for w, a in ((4, 4), (6, 8), (8, 8), (32, 32)):
        previous = None
        for step in range(1, 7):
            shape = {"cin": 16, "cout": 32, "size": 14, "kernel": 3}
            shape[grow] = {"cin": 16 * step, "cout": 32 * step, "size": 7 * step, "kernel": 2 * step - 1}[grow]
            layer = conv(shape["cin"], shape["cout"], shape["kernel"], shape["size"])
            cost = model.layer_cost(layer, w, a)
            if previous is not None:
                assert layer.macs > previous[0]
                assert cost.latency_ms >= previous[1].latency_ms
                assert cost.energy_mj > previous[1].energy_mj
            previous = (layer.macs, cost)


def test_compute_bound_layer_runs_four_times_faster_at_four_bits() -> None:
    model = BitFusionModel(layer_overhead_cycles=0, dram_bytes_per_cycle=1e9)  # no memory limit
    layer = conv(512, 512, 1, 32)
    eight, four = model.layer_cost(layer, 8, 8), model.layer_cost(layer, 4, 4)
    assert eight.compute_cycles == pytest.approx(4 * four.compute_cycles)
    assert eight.latency_ms == pytest.approx(4 * four.latency_ms)


def test_one_layer_by_hand() -> None:
    model = BitFusionModel(rows=32, cols=16, frequency_mhz=500, dram_bytes_per_cycle=16, weight_buffer_kib=64,
                           layer_overhead_cycles=100, brick_pj=0.015, sram_pj_per_bit=0.1, array_reuse=16,
                           dram_pj_per_bit=20, static_mw=50)
    layer = conv(64, 128, 3, 16)  # 64x128x3x3 weights, 16x16 output
    w, a = 8, 4
    per_unit = 16 / (4 * 2)
    compute = 16 * 16 * math.ceil(128 / 16) * math.ceil(64 * 9 / (32 * per_unit))
    weight_bytes = 64 * 128 * 9 * w / 8
    traffic = weight_bytes + 64 * 16 * 16 * a / 8 * math.ceil(weight_bytes / 65536) + 128 * 16 * 16 * a / 8
    cycles = max(compute, traffic / 16) + 100
    latency = cycles / 500e3
    energy = (layer.macs * 8 * 0.015 + layer.macs * (w + a) / 16 * 0.1 + traffic * 8 * 20) * 1e-9 + 50 * latency * 1e-3
    cost = model.layer_cost(layer, w, a)
    assert cost.compute_cycles == compute
    assert cost.dram_bytes == pytest.approx(traffic)
    assert cost.latency_ms == pytest.approx(latency)
    assert cost.energy_mj == pytest.approx(energy)


def test_depthwise_layers_use_the_array_poorly() -> None:
    model = BitFusionModel(layer_overhead_cycles=0, dram_bytes_per_cycle=1e9)
    pointwise = conv(96, 96, 1, 28)
    depthwise = conv(96, 96, 3, 28, groups=96)
    assert depthwise.macs < pointwise.macs
    pw, dw = model.layer_cost(pointwise, 8, 8), model.layer_cost(depthwise, 8, 8)
    # cycles per MAC: a 3x3 depthwise reduction fills 9 of the 32 rows
    assert dw.compute_cycles / depthwise.macs > 3 * pw.compute_cycles / pointwise.macs


def test_network_cost_sums_layers_and_batches_bits() -> None:
    model = BitFusionModel()
    layers = [LayerSpec(f"l{i}", s.op, s.in_channels, s.out_channels, s.kernel_size, s.stride, s.groups, s.in_size,
                        s.out_size, s.bias) for i, s in enumerate(random_layers(6, seed=3))]
    bits = {s.name: (8, 6) for s in layers}
    latency, energy = model.network_cost(layers, bits)
    single = [model.layer_cost(s, 8, 6) for s in layers]
    assert latency == pytest.approx(sum(c.latency_ms for c in single))
    assert energy == pytest.approx(sum(c.energy_mj for c in single))
    batched = model.layer_costs(layers, np.full((3, 6), 8), np.full((3, 6), 6))
    assert batched["latency_ms"].shape == (3, 6)
    assert batched["latency_ms"][2].sum() == pytest.approx(latency)
    assert model.network_cost([], {}) == (0.0, 0.0)


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="accelerator parameter rows must be positive, got 0"):
        BitFusionModel(rows=0)
    with pytest.raises(ValueError, match="accelerator parameter static_mw must be >= 0, got -1"):
        BitFusionModel(static_mw=-1)
    with pytest.raises(ValueError, match=r"one entry per layer \(2\)"):
        BitFusionModel().layer_costs(random_layers(2), [8], [8])
