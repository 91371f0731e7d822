"""The subnet space of one SpaceEvo space: protocols, configs, encoding, costs (torch-free)."""

from __future__ import annotations

import random

import pytest

from lightning_nas.errors import RecipeError
from lightning_nas.spaces.protocol import BoundedSpace, CostModelSpace, ElasticSpace, SearchSpace
from lightning_nas.spaces.spaceevo_layout import (
    CIFAR_LAYOUT,
    HeadSpec,
    MacroLayout,
    StageSpec,
    StemSpec,
    SubStage,
    extreme_substages,
    homogeneous_spaces,
    random_space,
    space_id,
    subnet_macs,
)
from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace, layout_from_hparams, layout_hparams

MIXED = "mbconv_se[1:5]-bottleneck[0:3]-dual_dw[2:4]-fused_mbconv[1:4]-fused_mbconv_se[2:6]"
TINY = MacroLayout(
    name="tiny", resolution=16, num_classes=5, stem=StemSpec(channels=8),
    stages=(StageSpec(1, (8, 12, 16)), StageSpec(2, (16, 24, 32))), head=HeadSpec(channels=32),
)


@pytest.fixture(scope="module")
def space() -> SpaceEvoSubnetSpace:
    return SpaceEvoSubnetSpace(MIXED)


def test_protocols(space: SpaceEvoSubnetSpace) -> None:
    assert isinstance(space, SearchSpace)
    assert isinstance(space, BoundedSpace)
    assert isinstance(space, CostModelSpace)
    assert not isinstance(space, ElasticSpace)  # per-stage choices differ, the width is elastic


def test_choices_follow_the_stage_block_types_and_windows(space: SpaceEvoSubnetSpace) -> None:
    assert space.block_types == ["mbconv_se", "bottleneck", "dual_dw", "fused_mbconv", "fused_mbconv_se"]
    assert space.stage_widths[0] == [12, 16, 20, 24]  # CIFAR stage 0 widths[1:5]
    assert space.stage_widths[2] == [64, 80]
    assert space.expand_choices[1] == [0.5, 1.0] and space.expand_choices[2] == [1]
    assert space.largest() == {"w": [24, 32, 80, 96, 224], "d": [4, 3, 4, 3, 3], "ks": [5, 5, 5, 3, 3],
                               "e": [6, 1.0, 1, 4, 4]}
    assert space.substages(space.smallest())[1] == SubStage(16, 1, 3, 0.5)


def test_costs_agree_with_the_layout(space: SpaceEvoSubnetSpace) -> None:
    for largest in (True, False):
        subs = extreme_substages(space.choice, largest)
        config = space.config_of(subs)
        assert config == (space.largest() if largest else space.smallest())
        assert space.macs(config) == subnet_macs(space.choice, subs)
    config = space.sample(random.Random(0))
    specs = space.layer_specs(config)
    assert [s.name for s in specs][:2] == ["stem.conv", "stages.0.blocks.0.expand.conv"]
    assert specs[-1].name == "classifier.linear"
    # a higher resolution costs more, only through the spatial sizes
    assert space.macs(config, resolution=64) > space.macs(config)
    assert space.params(config) > sum(s.params for s in specs)  # + batch-norm affine


def test_validate_names_the_bad_entry(space: SpaceEvoSubnetSpace) -> None:
    config = space.largest()
    with pytest.raises(ValueError, match=r"config\['w'\]\[2\] = 96 .*dual_dw.*\[64, 80\]"):
        space.validate({**config, "w": [24, 32, 96, 96, 224]})
    with pytest.raises(ValueError, match="unknown"):
        space.validate({**config, "r": 32})
    with pytest.raises(ValueError, match="5 entries"):
        space.validate({**config, "d": [2, 2]})
    with pytest.raises(ValueError, match="True"):
        space.validate({**config, "d": [True, 1, 2, 1, 1]})
    # an expand ratio written as 1.0 or 1 is the block type's own value
    assert space.validate({**config, "e": [6, 1, 1.0, 4, 4]})["e"] == [6, 1.0, 1, 4, 4]


def test_encoding_round_trips_and_is_one_hot(space: SpaceEvoSubnetSpace) -> None:
    rng = random.Random(1)
    sizes = sum(len(space.stage_widths[s]) + len(space.depth_choices[s]) + len(space.kernel_choices[s])
                + len(space.expand_choices[s]) for s in range(space.num_stages))
    assert space.encoding_size == sizes
    keys = set()
    for _ in range(50):
        config = space.sample(rng)
        vector = space.encode(config)
        assert sum(vector) == 4 * space.num_stages
        assert space.decode(vector) == config
        keys.add(space.config_key(config))
    assert len(keys) == 50
    with pytest.raises(ValueError, match="one-hot"):
        space.decode([0.0] * space.encoding_size)


def test_hparams_rebuild_the_space() -> None:
    for layout, text in ((CIFAR_LAYOUT, MIXED), (TINY, "dual_dw[0:2]-bottleneck[1:3]")):
        space = SpaceEvoSubnetSpace(text, layout)
        rebuilt = SpaceEvoSubnetSpace(**space.hparams())
        assert rebuilt == space and rebuilt.hparams() == space.hparams()
        assert layout_from_hparams(layout_hparams(layout)) == layout
    assert SpaceEvoSubnetSpace(MIXED).hparams() == {"space": MIXED, "layout": "spaceevo_cifar"}
    with pytest.raises(RecipeError, match="unknown SpaceEvo layout"):
        SpaceEvoSubnetSpace(MIXED, "imagenet")


def test_any_space_point_is_a_subnet_space() -> None:
    rng = random.Random(2)
    for choice in homogeneous_spaces() + [random_space(rng) for _ in range(5)]:
        space = SpaceEvoSubnetSpace(choice)
        assert space_id(space.choice) == space_id(choice)
        small, large = space.smallest(), space.largest()
        sample = space.sample(rng)
        assert space.macs(small) <= space.macs(sample) <= space.macs(large)
        assert space.macs(small) < space.macs(large)
