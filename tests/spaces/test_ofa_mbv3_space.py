"""The torch-free OFA MobileNetV3 space: configs, validation, encoding, evolution, costs."""

from __future__ import annotations

import ast
import inspect
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nas.registry import SPACES
from lightning_nas.spaces import ofa_mbv3 as module
from lightning_nas.spaces.ofa_mbv3 import PRESETS, OFAMobileNetV3Space

REPO = Path(__file__).resolve().parents[2]
SIMPLE_ANNOTATIONS = {"int", "float", "str", "bool", "list[int]", "list[str]"}


@pytest.fixture(scope="module")
def space() -> OFAMobileNetV3Space:
    return OFAMobileNetV3Space()


def test_module_imports_without_torch() -> None:
    code = (
        "import sys, lightning_nas.spaces.ofa_mbv3 as m\n"
        "space = m.OFAMobileNetV3Space()\n"
        "space.layer_specs(space.largest())\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_init_signature_is_explicit_and_simply_typed() -> None:
    cls = OFAMobileNetV3Space
    # the recipe validator reads this signature from source with ast
    tree = ast.parse(inspect.getsource(module))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert init.args.vararg is None and init.args.kwarg is None
    params = init.args.args[1:] + init.args.kwonlyargs
    assert len(params) >= 15
    for arg in params:
        text = ast.unparse(arg.annotation)
        base = text.removesuffix(" | None")
        assert base in SIMPLE_ANNOTATIONS, f"{cls.__name__}.{arg.arg}: {text}"
    assert len(init.args.defaults) == len(init.args.args) - 1  # every parameter has a default


def test_registry_and_cifar_defaults() -> None:
    assert set(PRESETS) == {"ofa_mbv3", "ofa_mbv3_cifar", "ofa_mbv3_cifar_4x4"}
    cifar = SPACES.build({"name": "ofa_mbv3_cifar"})
    assert type(cifar) is OFAMobileNetV3Space and cifar.name == "ofa_mbv3_cifar"
    assert (cifar.num_classes, cifar.resolutions, cifar.stem_stride) == (10, [24, 28, 32], 1)
    assert cifar.stage_widths == OFAMobileNetV3Space().stage_widths
    rebuilt = SPACES.build({"name": cifar.name, **cifar.hparams()})
    assert rebuilt == cifar and rebuilt.hparams() == cifar.hparams() and rebuilt.name == "ofa_mbv3_cifar"
    with pytest.raises(ValueError, match="unknown preset 'ofa_mbv3_tiny'.*ofa_mbv3_cifar"):
        OFAMobileNetV3Space.from_preset("ofa_mbv3_tiny")


def test_cifar_4x4_layout_keeps_4x4_maps_before_the_head() -> None:
    space = SPACES.build({"name": "ofa_mbv3_cifar_4x4"})
    assert space.name == "ofa_mbv3_cifar_4x4" and space.stage_strides == [2, 2, 2, 1, 1]
    largest = space.largest()
    head = next(spec for spec in space.layer_specs(largest) if spec.name == "head.final_expand.conv")
    assert (head.in_size, head.in_channels) == (4, 120)  # 160 * 0.75, rounded to 8
    # docs/benchmarks.md: 47.7M MACs for the largest subnet at 32 px (the 2x2 preset: 49.6M)
    assert space.macs(largest) == pytest.approx(47.67e6, rel=0.002)
    two_by_two = SPACES.build({"name": "ofa_mbv3_cifar"})
    assert space.macs(largest) < two_by_two.macs(two_by_two.largest())
    rebuilt = SPACES.build({"name": space.name, **space.hparams()})
    assert rebuilt == space


def test_imagenet_layout_matches_published_figures(space: OFAMobileNetV3Space) -> None:
    assert space.num_blocks == 20 and space.num_stages == 5
    assert space.resolutions == list(range(128, 225, 4))
    assert [b.use_se for b in space.blocks[::4]] == [False, True, False, True, True]
    assert [b.activation for b in space.blocks[::4]] == ["relu", "relu", "h_swish", "h_swish", "h_swish"]
    largest = space.largest()
    # DESIGN.md: 566M MACs at 224, 16.5M at 32x32, 7.7M parameters
    assert space.macs(largest) == pytest.approx(566e6, rel=0.005)
    assert space.macs(largest, resolution=32) == pytest.approx(16.5e6, rel=0.005)
    assert space.params(largest) == pytest.approx(7.7e6, rel=0.01)
    assert space.encoding_size == 25 + 20 * 6
    assert space.macs(space.smallest()) < space.macs(largest) / 5


def test_width_mult_rounds_channels_to_multiples_of_8() -> None:
    wide = OFAMobileNetV3Space(width_mult=1.2)
    assert all(w % 8 == 0 for w in wide.widths)
    assert wide.widths == [32, 48, 96, 136, 192]
    assert wide.feature_channels == 1536
    assert OFAMobileNetV3Space(width_mult=0.75).feature_channels == 1280


def test_sample_is_valid_canonical_and_seeded(space: OFAMobileNetV3Space) -> None:
    a = [space.sample(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    for _ in range(50):
        config = space.sample(rng)
        assert space.validate(config) == config
        assert space.canonical(config) == config
    assert space.largest()["d"] == [4] * 5 and space.smallest()["r"] == 128


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c.pop("r"), "missing key(s) ['r']"),
        (lambda c: c.update(extra=1), "unknown key(s) ['extra']"),
        (lambda c: c["ks"].__setitem__(3, 4), "config['ks'][3] = 4 is not allowed; choose from [3, 5, 7]"),
        (lambda c: c["e"].__setitem__(0, 5), "config['e'][0] = 5 is not allowed; choose from [3, 4, 6]"),
        (lambda c: c["d"].append(2), "config['d'] must have 5 entries, got 6"),
        (lambda c: c["d"].__setitem__(1, True), "config['d'][1] = True is not allowed"),
        (lambda c: c.update(r=130), "config['r'] = 130 is not allowed; choose from [128, 132"),
        (lambda c: c.update(ks="3"), "config['ks'] must be a list of 20 ints"),
    ],
)
def test_validate_names_key_value_and_choices(space: OFAMobileNetV3Space, change, fragment: str) -> None:
    config = space.largest()
    change(config)
    with pytest.raises(ValueError) as info:
        space.validate(config)
    assert fragment in str(info.value)


def test_validate_rejects_non_mapping(space: OFAMobileNetV3Space) -> None:
    with pytest.raises(ValueError, match="mapping"):
        space.validate([1, 2, 3])


def test_bad_space_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="stage_strides has 4 entries"):
        OFAMobileNetV3Space(stage_strides=[2, 2, 2, 1])
    with pytest.raises(ValueError, match="'gelu'"):
        OFAMobileNetV3Space(stage_activations=["relu", "gelu", "relu", "relu", "relu"])
    with pytest.raises(ValueError, match="odd"):
        OFAMobileNetV3Space(kernel_choices=[3, 4])


def test_canonical_normalises_skipped_blocks(space: OFAMobileNetV3Space) -> None:
    config = space.largest()
    config["d"] = [2, 3, 4, 2, 2]
    canonical = space.canonical(config)
    active = set(space.active_blocks(config))
    assert len(active) == 13
    for b in range(20):
        expected = (7, 6) if b in active else (3, 3)
        assert (canonical["ks"][b], canonical["e"][b]) == expected
    other = dict(config, ks=[5] * 20)
    other["ks"] = [7 if b in active else 5 for b in range(20)]
    assert space.config_key(other) == space.config_key(config)


def test_encoding_is_one_to_one_on_canonical_configs(space: OFAMobileNetV3Space) -> None:
    rng = random.Random(1)
    by_key: dict[tuple, tuple[float, ...]] = {}
    for _ in range(400):
        config = space.sample(rng)
        vec = space.encode(config)
        assert len(vec) == space.encoding_size
        assert set(vec) <= {0.0, 1.0}
        assert sum(vec) == 1 + 2 * sum(config["d"])
        assert space.decode(vec) == config
        by_key[space.config_key(config)] = tuple(vec)
    assert len(set(by_key.values())) == len(by_key)
    # skipped blocks are all zeros: a non-canonical twin encodes identically
    config = space.smallest()
    twin = dict(config, ks=[7] * 20)
    twin["ks"] = [config["ks"][b] if b in space.active_blocks(config) else 7 for b in range(20)]
    assert space.encode(twin) == space.encode(config)


def test_decode_rejects_non_leading_blocks(space: OFAMobileNetV3Space) -> None:
    vec = space.encode(space.smallest())
    offset = len(space.resolutions) + 3 * 6  # block 3 of stage 0 is skipped in the smallest net
    vec[offset] = 1.0
    vec[offset + 3] = 1.0
    with pytest.raises(ValueError, match="non-leading"):
        space.decode(vec)


def test_mutate_changes_with_probability_and_stays_valid(space: OFAMobileNetV3Space) -> None:
    rng = random.Random(2)
    parent = space.sample(rng)
    assert space.mutate(parent, rng, prob=0.0, resolution_prob=0.0) == parent
    changed = 0
    for _ in range(30):
        child = space.mutate(parent, rng, prob=0.3, resolution_prob=0.5)
        assert space.canonical(child) == child
        changed += child != parent
    assert changed >= 25
    # depth growth draws fresh choices for the revealed blocks
    small = space.smallest()
    grown = [space.mutate(small, random.Random(s), prob=1.0, resolution_prob=0.0) for s in range(40)]
    revealed = [
        c["ks"][b] for c in grown for b in space.active_blocks(c) if b not in space.active_blocks(small)
    ]
    assert {5, 7} <= set(revealed)


def test_crossover_takes_genes_from_running_parents(space: OFAMobileNetV3Space) -> None:
    rng = random.Random(4)
    a, b = space.sample(rng), space.sample(rng)
    assert space.crossover(a, a, rng) == a
    for _ in range(20):
        child = space.crossover(a, b, rng)
        assert space.canonical(child) == child
        assert child["r"] in (a["r"], b["r"])
        for s in range(5):
            assert child["d"][s] in (a["d"][s], b["d"][s])
        active_a, active_b = set(space.active_blocks(a)), set(space.active_blocks(b))
        for blk in space.active_blocks(child):
            donors = [p for p, act in ((a, active_a), (b, active_b)) if blk in act]
            if donors:
                assert any((p["ks"][blk], p["e"][blk]) == (child["ks"][blk], child["e"][blk]) for p in donors)


def test_reference_subnets_are_named_and_fixed_by_seed(space: OFAMobileNetV3Space) -> None:
    refs = space.reference_subnets(num_random=3, seed=7)
    assert list(refs) == ["smallest", "largest", "random0", "random1", "random2"]
    assert refs == space.reference_subnets(num_random=3, seed=7)
    assert refs["random0"] != space.reference_subnets(num_random=1, seed=8)["random0"]
    assert refs["largest"] == space.largest() and refs["smallest"] == space.smallest()


def test_layer_specs_roles_blocks_and_shapes(space: OFAMobileNetV3Space) -> None:
    config = space.sample(random.Random(5))
    specs = space.layer_specs(config)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert specs[0].name == "stem.conv" and specs[0].role == "stem" and specs[0].stride == 2
    assert [(s.name, s.role, s.block) for s in specs[1:3]] == [
        ("first_block.dw.conv", "dw", None),
        ("first_block.project.conv", "pw_project", None),
    ]
    assert [s.role for s in specs[-3:]] == ["head", "head", "classifier"]
    assert specs[-1].op == "linear" and specs[-1].out_channels == 1000
    blocks = {s.block for s in specs if s.block is not None}
    assert blocks == set(space.active_blocks(config))
    for s in specs:
        if s.block is None:
            continue
        assert s.name.startswith(f"blocks.{s.block}.")
        mid = space.mid_channels(s.block, config["e"][s.block])
        if s.role == "dw":
            assert (s.groups, s.in_channels, s.kernel_size) == (mid, mid, config["ks"][s.block])
        if s.role == "se_reduce":
            assert (s.in_channels, s.out_channels, s.in_size, s.bias) == (
                mid,
                space.se_channels(mid),
                1,
                True,
            )
    # spatial sizes chain: each layer's input is the previous feature map
    assert specs[0].in_size == config["r"]
    assert space.layer_specs(space.largest(), resolution=224)[-4].in_size == 7


def test_cifar_space_keeps_resolution_in_stem() -> None:
    cifar = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    specs = cifar.layer_specs(cifar.largest())
    assert specs[0].out_size == 32 and specs[-4].in_size == 2
