"""Every search space satisfies the SearchSpace protocol, and the layout variants are presets.

Checked for each registered space (built from its registry name), the quantization-policy space
over a fixed number of blocks, and the joint architecture x policy space (full precision and
quantized): seeded sampling, validate / canonical idempotence, encode / decode round trips,
mutation and crossover staying in the space, config keys, the registry spec that rebuilds the
space, and the cost methods of the spaces that describe their layers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from lightning_nas.errors import RecipeError
from lightning_nas.recipe.validate import validate_component
from lightning_nas.registry import SPACES
from lightning_nas.search.joint_space import JointSpace
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.protocol import BoundedSpace, CostModelSpace, ElasticSpace, SearchSpace
from lightning_nas.spaces.proxyless import ProxylessSpace, space_from_record
from lightning_nas.spaces.quant_policy import QuantPolicySpace
from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace

SAMPLES = 12


def _registered(name: str) -> Callable[[], Any]:
    return lambda: SPACES.build({"name": name})


FACTORIES: dict[str, Callable[[], Any]] = {
    **{name: _registered(name) for name in SPACES.names()},
    "quant_policy": lambda: QuantPolicySpace(bit_choices=[4, 6, 8]).over(10),
    "joint_fp32": lambda: JointSpace(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")),
    "joint_quant": lambda: JointSpace(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"), QuantPolicySpace()),
    "spaceevo_subnets": lambda: SpaceEvoSubnetSpace(
        "dual_dw[0:2]-mbconv[1:5]-bottleneck[2:4]-fused_mbconv_se[0:3]-mbconv_se[3:6]"
    ),
}

#: Which of the narrower protocols each space implements, so a lost method fails here.
CAPABILITIES: dict[str, set[type]] = {
    "nb201": set(),
    "ofa_mbv3": {CostModelSpace, BoundedSpace, ElasticSpace},
    "ofa_mbv3_cifar": {CostModelSpace, BoundedSpace, ElasticSpace},
    "ofa_mbv3_cifar_4x4": {CostModelSpace, BoundedSpace, ElasticSpace},
    "proxyless": {CostModelSpace},
    "proxyless_cifar": {CostModelSpace},
    "quant_policy": {BoundedSpace},
    "joint_fp32": {BoundedSpace},
    "joint_quant": {BoundedSpace},
    "spaceevo_subnets": {CostModelSpace, BoundedSpace},
}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def named_space(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, FACTORIES[request.param]()


def same(space: Any, a: Any, b: Any) -> bool:
    return space.config_key(a) == space.config_key(b)


def test_every_registered_space_is_covered() -> None:
    assert set(SPACES.names()) <= set(FACTORIES) == set(CAPABILITIES)


def test_protocols_each_space_satisfies(named_space: tuple[str, Any]) -> None:
    name, space = named_space
    assert isinstance(space, SearchSpace)
    for protocol in (CostModelSpace, BoundedSpace, ElasticSpace):
        assert isinstance(space, protocol) == (protocol in CAPABILITIES[name]), (name, protocol.__name__)
    assert isinstance(space.name, str) and space.name
    assert isinstance(space.hparams(), dict)


def test_sample_is_seeded_valid_and_canonical(named_space: tuple[str, Any]) -> None:
    _, space = named_space
    first = [space.sample(random.Random(3)) for _ in range(2)]
    assert same(space, first[0], first[1])  # same seed, same point
    rng = random.Random(0)
    samples = [space.sample(rng) for _ in range(SAMPLES)]
    assert len({space.config_key(s) for s in samples}) > 1  # not a constant
    for config in samples:
        assert same(space, space.validate(config), config)
        canonical = space.canonical(config)
        assert same(space, space.canonical(canonical), canonical)


def test_encode_decode_round_trip(named_space: tuple[str, Any]) -> None:
    _, space = named_space
    rng = random.Random(1)
    for _ in range(SAMPLES):
        config = space.sample(rng)
        vector = space.encode(config)
        assert len(vector) == space.encoding_size
        assert set(vector) <= {0.0, 1.0}
        decoded = space.decode(vector)
        assert same(space, decoded, config)
        assert space.encode(decoded) == vector
    with pytest.raises(ValueError, match="entries"):
        space.decode([0.0] * (space.encoding_size + 1))


def test_mutate_and_crossover_stay_in_the_space(named_space: tuple[str, Any]) -> None:
    _, space = named_space
    rng = random.Random(2)
    changed = mixed = 0
    for _ in range(SAMPLES):
        a, b = space.sample(rng), space.sample(rng)
        child = space.mutate(a, rng)
        assert same(space, space.canonical(child), child)
        changed += not same(space, child, a)
        kid = space.crossover(a, b, rng)
        assert same(space, space.canonical(kid), kid)
        mixed += not same(space, kid, a) and not same(space, kid, b)
        assert same(space, space.crossover(a, a, rng), a)  # nothing to mix
    assert changed > 0 and mixed > 0


def test_bounded_spaces_have_valid_extremes(named_space: tuple[str, Any]) -> None:
    name, space = named_space
    if BoundedSpace not in CAPABILITIES[name]:
        pytest.skip(f"{name} has no smallest / largest point")
    small, large = space.smallest(), space.largest()
    assert same(space, space.canonical(small), small) and same(space, space.canonical(large), large)
    assert not same(space, small, large)
    if isinstance(space, CostModelSpace):
        sample = space.sample(random.Random(4))
        assert space.macs(small) < space.macs(sample) < space.macs(large)


def test_cost_model_spaces_count_their_layer_specs(named_space: tuple[str, Any]) -> None:
    name, space = named_space
    if CostModelSpace not in CAPABILITIES[name]:
        pytest.skip(f"{name} does not describe its layers")
    rng = random.Random(5)
    for _ in range(3):
        config = space.sample(rng)
        specs = space.layer_specs(config)
        assert specs and space.macs(config) == sum(s.macs for s in specs) > 0
        assert space.params(config) >= sum(s.params for s in specs) > 0


@pytest.mark.parametrize("name", SPACES.names())
def test_registry_spec_rebuilds_the_space_under_its_name(name: str) -> None:
    space = SPACES.build({"name": name})
    assert space.name == name
    rebuilt = SPACES.build({"name": space.name, **space.hparams()})
    assert rebuilt == space and rebuilt.name == name and rebuilt.hparams() == space.hparams()


# ------------------------------------------------------------------ presets replace the subclasses

#: The defaults of the removed ``OFAMobileNetV3CifarSpace`` subclass (its signature, as of e965003).
OLD_OFA_CIFAR = {
    "num_classes": 10, "width_mult": 1.0, "resolutions": [24, 28, 32], "kernel_choices": [3, 5, 7],
    "expand_choices": [3, 4, 6], "depth_choices": [2, 3, 4], "stage_widths": [24, 40, 80, 112, 160],
    "stage_strides": [2, 2, 2, 1, 2], "stage_activations": ["relu", "relu", "h_swish", "h_swish", "h_swish"],
    "se_stages": [1, 3, 4], "stem_channels": 16, "stem_stride": 1, "first_block_channels": 16,
    "head_channels": 960, "feature_channels": 1280, "se_reduction": 4, "dropout": 0.1, "bn_momentum": 0.1,
    "bn_eps": 1e-5,
}
#: The defaults of the removed ``ProxylessCifarSpace`` subclass (as of e965003).
OLD_PROXYLESS_CIFAR = {
    "num_classes": 10, "width_mult": 1.0, "resolution": 32,
    "candidate_ops": ["3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6", "7x7_MBConv3", "7x7_MBConv6", "zero"],
    "stage_widths": [24, 40, 80, 96, 192, 320], "stage_depths": [4, 4, 4, 4, 4, 1], "stage_strides": [1, 2, 2, 1, 2, 1],
    "stem_channels": 32, "stem_stride": 1, "first_block_channels": 16, "feature_channels": 1280, "dropout": 0.0,
    "bn_momentum": 0.1, "bn_eps": 1e-3,
}


def test_ofa_cifar_preset_is_the_old_subclass() -> None:
    preset = SPACES.build({"name": "ofa_mbv3_cifar"})
    assert type(preset) is OFAMobileNetV3Space
    assert preset.hparams() == OLD_OFA_CIFAR
    # MACs / parameters of the old subclass, printed by it before the change (commit e965003)
    assert (preset.macs(preset.largest()), preset.macs(preset.smallest())) == (49_554_816, 7_602_536)
    assert (preset.params(preset.largest()), preset.params(preset.smallest())) == (6_396_570, 2_142_602)
    assert preset.encoding_size == 123
    # a checkpoint's stored spec (name + every argument) and the plain class with those arguments
    stored = SPACES.build({"name": "ofa_mbv3_cifar", **OLD_OFA_CIFAR})
    assert stored == preset and stored.name == "ofa_mbv3_cifar"
    assert OFAMobileNetV3Space(**OLD_OFA_CIFAR) == preset
    # arguments override the preset's, as they overrode the subclass's defaults
    narrow = SPACES.build({"name": "ofa_mbv3_cifar", "width_mult": 0.5, "dropout": 0.0})
    assert narrow.hparams() == {**OLD_OFA_CIFAR, "width_mult": 0.5, "dropout": 0.0}


def test_proxyless_cifar_preset_is_the_old_subclass() -> None:
    preset = SPACES.build({"name": "proxyless_cifar"})
    assert type(preset) is ProxylessSpace and preset.hparams() == OLD_PROXYLESS_CIFAR
    big, small = preset.uniform_op("7x7_MBConv6"), preset.uniform_op("3x3_MBConv3")
    # figures of the old subclass (commit e965003)
    assert (preset.macs(big), preset.params(big), preset.macs(small)) == (187_834_880, 3_835_146, 76_179_968)
    record = {"space": {"name": "proxyless_cifar", **OLD_PROXYLESS_CIFAR}, "ops": big}
    rebuilt = space_from_record(record, num_classes=100)
    assert rebuilt.name == "proxyless_cifar" and rebuilt.num_classes == 100 and rebuilt.stem_stride == 1


def test_preset_specs_are_validated_against_the_class_signature() -> None:
    validate_component("space", {"name": "ofa_mbv3_cifar", "dropout": 0.2}, "task.space")
    with pytest.raises(RecipeError, match="unknown key") as error:
        validate_component("space", {"name": "ofa_mbv3_cifar", "stem_strides": 1}, "task.space")
    assert error.value.suggestion == "stem_stride"
    with pytest.raises(ValueError, match="unknown preset"):
        ProxylessSpace.from_preset("proxyless_tiny")
