from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.quant_policy import POLICY_KEYS, QuantPolicySpace

MODULE = Path(__file__).resolve().parents[2] / "lightning_nas" / "spaces" / "quant_policy.py"


def _layers() -> list[LayerSpec]:
    def spec(
        name: str,
        role: str,
        block: int | None,
        cin: int,
        cout: int,
        k: int = 1,
        groups: int = 1,
        size: int = 8,
    ):
        return LayerSpec(name, "conv", cin, cout, k, 1, groups, size, size, False, role=role, block=block)

    return [
        spec("stem", "stem", None, 3, 16, k=3),
        spec("first.dw", "dw", None, 16, 16, k=3, groups=16),  # the fixed first block
        spec("first.pw", "pw_project", None, 16, 16),
        spec("blocks.0.expand", "pw_expand", 0, 16, 64),
        spec("blocks.0.dw", "dw", 0, 64, 64, k=5, groups=64),
        spec("blocks.0.se.reduce", "se_reduce", 0, 64, 16, size=1),
        spec("blocks.0.se.expand", "se_expand", 0, 16, 64, size=1),
        spec("blocks.0.project", "pw_project", 0, 64, 24),
        spec("blocks.1.expand", "pw_expand", 1, 24, 72),
        spec("blocks.1.dw", "dw", 1, 72, 72, k=3, groups=72),
        spec("blocks.1.project", "pw_project", 1, 72, 24),
        spec("head", "head", None, 24, 96),
        LayerSpec("classifier", "linear", 96, 10, 1, 1, 1, 1, 1, True, role="classifier"),
    ]


def test_module_imports_without_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('quant_policy', {str(MODULE)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.QuantPolicySpace().sample(0, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_sample_uniform_and_json_round_trip() -> None:
    space = QuantPolicySpace()
    assert space.bit_choices == [4, 6, 8] and space.fixed_bits == 8
    policy = space.sample(random.Random(3), 20)
    assert set(policy) == set(POLICY_KEYS) and all(len(v) == 20 for v in policy.values())
    assert space.validate(json.loads(json.dumps(policy)), 20) == policy
    assert space.sample(7, 20) == space.sample(7, 20)
    assert space.uniform(6, 4) == {k: [6, 6, 6, 6] for k in POLICY_KEYS}
    with pytest.raises(ValueError, match=r"uniform bits 5 is not in the allowed set \[4, 6, 8\]"):
        space.uniform(5, 4)


def test_constructor_rejects_unsupported_bits() -> None:
    with pytest.raises(ValueError, match=r"bit_choices \[9\] not supported"):
        QuantPolicySpace(bit_choices=[4, 9])
    with pytest.raises(ValueError, match="fixed_bits=16 not supported"):
        QuantPolicySpace(fixed_bits=16)
    assert QuantPolicySpace(bit_choices=[8, 2], fixed_bits=32).bit_choices == [2, 8]


def test_invalid_policies_have_clear_messages() -> None:
    space = QuantPolicySpace()
    good = space.uniform(8, 3)
    bad_value = {**good, "dw_a": [8, 5, 8]}
    with pytest.raises(
        ValueError, match=r"key 'dw_a' index 1: value 5 is not in the allowed set \[4, 6, 8\]"
    ):
        space.validate(bad_value, 3)
    with pytest.raises(ValueError, match=r"key 'pw_w' has 2 entries, expected 3 \(one per block slot\)"):
        space.validate({**good, "pw_w": [8, 8]}, 3)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['pw_a'\]"):
        space.validate({k: v for k, v in good.items() if k != "pw_a"}, 3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['se_w'\]"):
        space.validate({**good, "se_w": [8, 8, 8]}, 3)
    with pytest.raises(ValueError, match="index 0: value True"):
        space.validate({**good, "pw_a": [True, 8, 8]}, 3)
    with pytest.raises(ValueError, match="must be a list of bit widths"):
        space.validate({**good, "pw_a": "888"}, 3)


def test_encode_one_hot_with_skipped_blocks() -> None:
    space = QuantPolicySpace()
    policy = {"pw_w": [4, 6, 8], "pw_a": [8, 8, 8], "dw_w": [6, 6, 6], "dw_a": [4, 4, 4]}
    code = space.encode(policy, [True, False, True])
    assert len(code) == space.encoding_size(3) == 3 * 4 * 3
    block0, block1, block2 = code[:12], code[12:24], code[24:]
    assert block0 == [1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0]
    assert block1 == [0.0] * 12
    assert block2[:3] == [0, 0, 1] and sum(block2) == 4
    with pytest.raises(ValueError, match="expected 2"):
        space.encode(policy, [True, True])


def test_mutate_and_crossover_stay_valid() -> None:
    space = QuantPolicySpace()
    rng = random.Random(0)
    a, b = space.uniform(4, 10), space.uniform(8, 10)
    assert space.mutate(a, rng, prob=0.0) == a
    mutated = space.mutate(a, rng, prob=1.0)
    space.validate(mutated, 10)
    assert mutated != a
    child = space.crossover(a, b, rng)
    space.validate(child, 10)
    values = {v for key in POLICY_KEYS for v in child[key]}
    assert values == {4, 8}  # every entry from a parent, both parents used
    with pytest.raises(ValueError, match="expected 10"):
        space.crossover(a, space.uniform(8, 9), rng)


def test_bits_for_layers_binds_roles() -> None:
    space = QuantPolicySpace()
    policy = {"pw_w": [4, 6], "pw_a": [6, 8], "dw_w": [8, 4], "dw_a": [6, 4]}
    bits = space.bits_for_layers(_layers(), policy)
    assert bits["stem"] == bits["first.dw"] == bits["head"] == bits["classifier"] == (8, 8)
    assert bits["blocks.0.expand"] == bits["blocks.0.project"] == (4, 6)
    assert bits["blocks.0.dw"] == (8, 6)
    assert bits["blocks.0.se.reduce"] == bits["blocks.0.se.expand"] == (8, 8)  # SE stays fixed
    assert bits["blocks.1.expand"] == (6, 8) and bits["blocks.1.dw"] == (4, 4)
    with pytest.raises(ValueError, match="belongs to block 1, but the policy has 1 block slots"):
        space.bits_for_layers(_layers(), {k: v[:1] for k, v in policy.items()})
    full = QuantPolicySpace(fixed_bits=32).bits_for_layers(_layers(), policy)
    assert full["stem"] == (32, 32)


def test_average_bits_weighted_by_macs() -> None:
    space = QuantPolicySpace()
    layers = _layers()
    assert space.average_bits(space.uniform(8, 2), layers) == (8.0, 8.0)
    policy = {"pw_w": [4, 4], "pw_a": [4, 4], "dw_w": [4, 4], "dw_a": [4, 4]}
    bits = space.bits_for_layers(layers, policy)
    total = sum(spec.macs for spec in layers)
    expected = sum(spec.macs * bits[spec.name][0] for spec in layers) / total
    weight, act = space.average_bits(policy, layers)
    assert weight == pytest.approx(expected) and act == pytest.approx(expected)
    assert 4.0 < weight < 8.0


def test_validate_returns_fresh_lists_and_still_rejects_near_misses() -> None:
    space = QuantPolicySpace()
    policy = space.uniform(8, 3)
    checked = space.validate(policy, 3)
    assert checked == policy and all(checked[k] is not policy[k] for k in policy)
    for bad in ({**policy, "pw_w": [8, 8, True]}, {**policy, "pw_w": [8, 8, 8.0]}, {**policy, "pw_w": (8, 8, 5)}):
        with pytest.raises(ValueError, match="pw_w"):
            space.validate(bad, 3)
