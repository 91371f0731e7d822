"""The torch-free SpaceEvo layout: block types, windows, ids and vectors, seeds, mutation, costs."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_nas.errors import RecipeError
from lightning_nas.spaces import spaceevo_layout as L
from lightning_nas.spaces.spaceevo_layout import (
    BLOCK_TYPES,
    CIFAR_LAYOUT,
    MAX_WINDOW,
    MIN_WINDOW,
    SpaceChoice,
    StageChoice,
    SubStage,
)

REPO = Path(__file__).resolve().parents[2]
LAYOUT = CIFAR_LAYOUT


def test_module_imports_without_torch_or_numpy() -> None:
    code = ("import sys, random, lightning_nas.spaces.spaceevo_layout as m\n"
            "c = m.random_space(random.Random(0))\n"
            "m.subnet_macs(c, m.extreme_substages(c, True))\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_block_types_and_layout() -> None:
    assert {"dual_dw", "mbconv", "mbconv_se", "bottleneck", "fused_mbconv", "fused_mbconv_se"} <= set(BLOCK_TYPES)
    assert BLOCK_TYPES["dual_dw"].expands == (1,) and BLOCK_TYPES["dual_dw"].kernels == (3, 5)
    assert BLOCK_TYPES["mbconv"].activation == "relu6" and not BLOCK_TYPES["mbconv"].se
    assert BLOCK_TYPES["mbconv_se"].se and BLOCK_TYPES["mbconv_se"].activation == "h_swish"
    assert BLOCK_TYPES["bottleneck"].expands == (0.5, 1.0)
    assert BLOCK_TYPES["fused_mbconv"].kernels == (3,) and BLOCK_TYPES["fused_mbconv"].expands == (2, 4)
    assert BLOCK_TYPES["fused_mbconv_se"].se and not BLOCK_TYPES["fused_mbconv"].se
    for name, spec in BLOCK_TYPES.items():
        assert spec.name == name and spec.activation in L.ACTIVATIONS and spec.description
        assert all(k % 2 == 1 for k in spec.kernels)
    assert LAYOUT.block_types == tuple(BLOCK_TYPES)
    assert 4 <= LAYOUT.num_stages <= 5 and LAYOUT.resolution == 32
    assert LAYOUT.stage_sizes() == [32, 16, 8, 4, 4]
    for stage in LAYOUT.stages:
        assert 6 <= len(stage.widths) <= 8 and list(stage.widths) == sorted(set(stage.widths))


def _top(name: str) -> SpaceChoice:
    return SpaceChoice(tuple(StageChoice(name, (len(s.widths) - MAX_WINDOW, len(s.widths))) for s in LAYOUT.stages))


def _bottom(name: str) -> SpaceChoice:
    return SpaceChoice(tuple(StageChoice(name, (0, MIN_WINDOW)) for _ in LAYOUT.stages))


def _macs(choice: SpaceChoice, largest: bool) -> float:
    return L.subnet_macs(choice, L.extreme_substages(choice, largest)) / 1e6


def test_mac_range_is_cifar_sized() -> None:
    # pinned figures of the layout's docstring (largest / smallest subnets, millions of MACs)
    largest = {name: _macs(_top(name), True) for name in BLOCK_TYPES}
    smallest = {name: _macs(_bottom(name), False) for name in BLOCK_TYPES}
    assert largest["dual_dw"] == pytest.approx(13.1, abs=0.1)
    assert largest["mbconv"] == pytest.approx(64.6, abs=0.1)
    assert largest["bottleneck"] == pytest.approx(94.4, abs=0.1)
    assert largest["fused_mbconv_se"] == pytest.approx(115.0, abs=0.1)
    assert max(largest.values()) < 120 and 1.5 < min(smallest.values()) < max(smallest.values()) < 6


def test_block_layers_hand_counted() -> None:
    # mbconv 16 -> 24, stride 2, k5, e4 at 16 px: mid 64
    specs = L.block_layers("mbconv", 16, 24, 2, 5, 4, 16)
    assert [s.name for s in specs] == ["expand.conv", "dw.conv", "project.conv"]
    assert sum(s.macs for s in specs) == 16 * 64 * 256 + 64 * 25 * 64 + 64 * 24 * 64
    # SE on the hidden channels: reduce to 64 // 4 = 16
    se = L.block_layers("mbconv_se", 16, 24, 2, 5, 4, 16)
    assert [(s.name, s.in_channels, s.out_channels) for s in se if s.name.startswith("se.")] == [
        ("se.reduce", 64, 16), ("se.expand", 16, 64)]
    # bottleneck 32 -> 48, e0.5: mid 24, full 3x3 conv, projection shortcut
    bott = L.block_layers("bottleneck", 32, 48, 2, 3, 0.5, 8)
    assert [s.name for s in bott] == ["reduce.conv", "conv.conv", "expand.conv", "shortcut.conv"]
    assert sum(s.macs for s in bott) == 32 * 24 * 64 + 24 * 24 * 9 * 16 + 24 * 48 * 16 + 32 * 48 * 16
    assert [s.name for s in L.block_layers("bottleneck", 48, 48, 1, 3, 0.5, 8)][-1] == "expand.conv"
    dual = L.block_layers("dual_dw", 8, 16, 1, 3, 1, 4)
    assert sum(s.macs for s in dual) == 8 * 9 * 16 + 8 * 16 * 16 + 16 * 9 * 16 + 16 * 16 * 16
    fused = L.block_layers("fused_mbconv", 8, 16, 1, 3, 2, 4)
    assert [(s.in_channels, s.out_channels, s.kernel_size) for s in fused] == [(8, 16, 3), (16, 16, 1)]


def test_substage_choices_follow_window() -> None:
    stage = LAYOUT.stages[2]
    subs = L.substage_choices(2, "mbconv", (1, 4))
    assert len(subs) == 3 * 3 * 2 * 2 and all(isinstance(s, SubStage) for s in subs)
    assert {s.width for s in subs} == set(stage.widths[1:4])
    assert subs[0] == SubStage(stage.widths[1], 2, 3, 4) and subs[-1] == SubStage(stage.widths[3], 4, 5, 6)
    whole = L.substage_choices(2, "fused_mbconv")
    assert len(whole) == len(stage.widths) * 3 * 1 * 2
    with pytest.raises(RecipeError, match="window"):
        L.substage_choices(2, "mbconv", (0, 6))


space_ids = st.tuples(*[
    st.tuples(st.sampled_from(LAYOUT.block_types), st.sampled_from(L.stage_windows(i)))
    for i in range(LAYOUT.num_stages)])


@settings(max_examples=300, deadline=None)
@given(space_ids)
def test_id_and_vector_round_trip(stages: tuple) -> None:
    choice = L.validate(list(stages))
    assert L.parse_space_id(L.space_id(choice)) == choice
    assert L.parse_space_id(choice.id) == choice and str(choice) == choice.id
    vector = L.encode(choice)
    assert len(vector) == 3 * LAYOUT.num_stages and all(type(v) is int for v in vector)
    assert L.decode(vector) == choice
    assert L.validate(choice.id) == choice


def test_id_format() -> None:
    choice = L.validate([("mbconv_se", (1, 4)), ("bottleneck", (0, 3)), ("dual_dw", (2, 4)),
                         ("fused_mbconv", (0, 2)), ("mbconv", (2, 6))])
    assert choice.id == "mbconv_se[1:4]-bottleneck[0:3]-dual_dw[2:4]-fused_mbconv[0:2]-mbconv[2:6]"
    assert L.encode(choice) == [2, 1, 4, 3, 0, 3, 0, 2, 4, 4, 0, 2, 1, 2, 6]


def test_random_spaces_round_trip_and_cover_every_block_type() -> None:
    rng = np.random.default_rng(0)
    spaces = [L.random_space(rng) for _ in range(600)]
    for choice in spaces[:200]:
        assert L.decode(L.encode(choice)) == choice == L.parse_space_id(choice.id)
    names = Counter(stage.block_type for choice in spaces for stage in choice.stages)
    assert set(names) == set(LAYOUT.block_types)
    # uniform: each of 6 types ~500 of 3000 stage draws
    assert min(names.values()) > 400
    windows = Counter(stage.window for choice in spaces for stage in choice.stages[:1])
    assert set(windows) == set(L.stage_windows(0))
    # same seed, same spaces; random.Random also works
    assert [L.random_space(np.random.default_rng(5)) for _ in range(1)] == [L.random_space(np.random.default_rng(5))]
    assert L.random_space(random.Random(3)) == L.random_space(random.Random(3))


def test_windows_and_homogeneous_spaces() -> None:
    windows = L.stage_windows(0)
    assert len(windows) == len(set(windows)) == 5 + 4 + 3
    assert all(MIN_WINDOW <= b - a <= MAX_WINDOW for a, b in windows)
    seeds = L.homogeneous_spaces()
    assert [s.stages[0].block_type for s in seeds] == list(LAYOUT.block_types)
    for seed in seeds:
        assert len({stage.block_type for stage in seed.stages}) == 1
        assert [stage.window for stage in seed.stages] == [(1, 5)] * LAYOUT.num_stages
        assert L.validate(seed) == seed


@pytest.mark.parametrize("seed", range(20))
def test_mutations_change_exactly_one_stage_and_one_gene(seed: int) -> None:
    rng = np.random.default_rng(seed)
    parent = L.random_space(rng)
    child = L.mutate_block_type(parent, rng)
    diff = [i for i in range(LAYOUT.num_stages) if child.stages[i] != parent.stages[i]]
    assert len(diff) == 1
    (i,) = diff
    assert child.stages[i].window == parent.stages[i].window
    assert child.stages[i].block_type != parent.stages[i].block_type
    child = L.mutate_window(parent, rng)
    diff = [i for i in range(LAYOUT.num_stages) if child.stages[i] != parent.stages[i]]
    assert len(diff) == 1
    (i,) = diff
    assert child.stages[i].block_type == parent.stages[i].block_type
    assert child.stages[i].window != parent.stages[i].window
    assert L.validate(child) == child


def test_mutations_reach_every_alternative() -> None:
    rng = random.Random(0)
    parent = L.homogeneous_spaces()[1]
    children = [L.mutate_block_type(parent, rng) for _ in range(400)]
    assert {c.stages[0].block_type for c in children if c.stages[0] != parent.stages[0]} == (
        set(LAYOUT.block_types) - {"mbconv"})
    assert {i for c in children for i in range(LAYOUT.num_stages) if c.stages[i] != parent.stages[i]} == set(
        range(LAYOUT.num_stages))
    children = [L.mutate_window(parent, rng) for _ in range(600)]
    assert {c.stages[0].window for c in children if c.stages[0] != parent.stages[0]} == (
        set(L.stage_windows(0)) - {(1, 5)})


def test_validation_errors_name_key_and_allowed() -> None:
    good = [("mbconv", (0, 2))] * LAYOUT.num_stages
    with pytest.raises(RecipeError) as error:
        L.validate([("conv_lstm", (0, 2))] + good[1:])
    assert error.value.key == "stages[0].block_type" and "fused_mbconv_se" in error.value.allowed
    assert "did you mean" not in str(error.value) and "conv_lstm" in str(error.value)
    with pytest.raises(RecipeError) as error:
        L.validate(good[:2] + [("mbconv", (0, 5))] + good[3:])
    assert error.value.key == "stages[2].window" and "2 <= stop - start <= 4" in error.value.allowed
    with pytest.raises(RecipeError) as error:
        L.validate(good[:1] + [("mbconv", (4, 7))] + good[2:])
    assert error.value.key == "stages[1].window" and "stop <= 6" in error.value.allowed
    with pytest.raises(RecipeError, match="wrong number of stages") as error:
        L.validate(good[:3])
    assert error.value.allowed == "5 stages"
    with pytest.raises(RecipeError) as error:
        L.validate(good[:4] + [{"block_type": "mbconv", "widow": [0, 2]}])
    assert error.value.key == "stages[4]" and "window" in error.value.allowed
    assert L.validate(good[:4] + [{"block_type": "mbconv", "window": [0, 2]}]).stages[4].window == (0, 2)
    with pytest.raises(RecipeError, match="not a space id"):
        L.parse_space_id("mbconv(0,2)")
    with pytest.raises(RecipeError) as error:
        L.decode([9, 0, 2] * LAYOUT.num_stages)
    assert error.value.key == "vector[0]" and "dual_dw" in error.value.allowed
    with pytest.raises(RecipeError, match="3 integers per stage"):
        L.decode([0, 0, 2])


def test_subnet_layers_check_substages() -> None:
    choice = L.homogeneous_spaces()[0]
    subs = L.extreme_substages(choice, True)
    names = [s.name for s in L.subnet_layers(choice, subs)]
    assert names[0] == "stem.conv" and names[-2:] == ["head.conv", "classifier.linear"]
    assert "stages.0.blocks.0.dw1.conv" in names and "stages.4.blocks.3.pw2.conv" in names
    bad = list(subs)
    bad[1] = SubStage(LAYOUT.stages[1].widths[0], 2, 3, 1)  # width outside the window [1:5]
    with pytest.raises(RecipeError) as error:
        L.subnet_layers(choice, bad)
    assert error.value.key == "substages[1]"
