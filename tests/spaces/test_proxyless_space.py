"""The ProxylessNAS space: op vocabulary, layout, validation, layer specs, costs, derived-arch files."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import REPO

from lightning_nas.nn.builders import build_subnet
from lightning_nas.spaces.proxyless import (
    DEFAULT_CANDIDATES,
    ZERO,
    ProxylessSpace,
    derived_arch_record,
    expected_cost,
    load_derived_arch,
    op_name,
    parse_op,
)


def tiny_space(**overrides) -> ProxylessSpace:
    arguments = {"num_classes": 10, "resolution": 32, "width_mult": 0.35, "stage_depths": [1, 2, 1, 1, 2, 1]}
    return ProxylessSpace(**{**arguments, **overrides})


def test_op_vocabulary_round_trips_and_rejects_malformed_names() -> None:
    for kernel in (3, 5, 7):
        for expand in (1, 3, 6):
            assert parse_op(op_name(kernel, expand)) == (kernel, expand)
    assert parse_op(ZERO) is None
    with pytest.raises(ValueError, match="unknown op 'conv3x3'"):
        parse_op("conv3x3")
    with pytest.raises(ValueError, match="square and odd"):
        parse_op("4x4_MBConv6")
    with pytest.raises(ValueError, match="square and odd"):
        parse_op("3x5_MBConv6")
    with pytest.raises(ValueError, match="expand ratio must be >= 1"):
        parse_op("3x3_MBConv0")


def test_imagenet_layout_has_21_layers_and_zero_only_where_a_shortcut_exists() -> None:
    space = ProxylessSpace()
    assert space.num_layers == 21
    firsts = {0, 4, 8, 12, 16, 20}  # first layer of every stage: stride or width change
    for layer in space.layers:
        assert layer.shortcut == (layer.index not in firsts)
        assert (ZERO in layer.candidates) == layer.shortcut
        assert len(layer.candidates) == (7 if layer.shortcut else 6)
    # 224 -> stem /2 -> 112, stages /2 /2 /2 /1 /2 /1 -> 7x7 before the feature mix
    assert space.input_sizes()[0] == 112
    assert space.final_size() == 7
    cifar = ProxylessSpace.from_preset("proxyless_cifar")
    assert cifar.final_size() == 4 and cifar.input_sizes()[0] == 32


def test_bad_constructor_arguments_fail_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="stage_depths has 2 entries but stage_widths has 6"):
        ProxylessSpace(stage_depths=[1, 1])
    with pytest.raises(ValueError, match=r"candidate_ops lists \['3x3_MBConv3'\] more than once"):
        ProxylessSpace(candidate_ops=["3x3_MBConv3", "3x3_MBConv3"])
    with pytest.raises(ValueError, match="at least one MBConv op"):
        ProxylessSpace(candidate_ops=[ZERO])
    with pytest.raises(ValueError, match="unknown op 'sep3x3'"):
        ProxylessSpace(candidate_ops=["sep3x3"])
    with pytest.raises(ValueError, match="stage_strides must be 1 or 2"):
        ProxylessSpace(stage_strides=[2, 2, 3, 1, 2, 1])


def test_validate_names_the_layer_the_op_and_the_allowed_ops() -> None:
    space = tiny_space()
    arch = space.uniform_op("3x3_MBConv6")
    assert space.validate({"ops": arch}) == arch
    with pytest.raises(ValueError, match="has 3 ops but the space has 8 searchable layers"):
        space.validate(arch[:3])
    bad = list(arch)
    bad[0] = ZERO
    with pytest.raises(ValueError, match=r"layer 0 \(stage 0, stride 2, 8->8 channels, no shortcut\): op 'zero' "
                                         r"is not a candidate \('zero' needs a shortcut\)"):
        space.validate(bad)
    bad = list(arch)
    bad[2] = "9x9_MBConv6"
    with pytest.raises(ValueError, match=r"layer 2 .*op '9x9_MBConv6' is not a candidate; allowed: \['3x3_MBConv3'"):
        space.validate(bad)
    with pytest.raises(ValueError, match="needs an 'ops' list"):
        space.validate({"arch": arch})


def test_layer_specs_are_the_derived_networks_convolutions() -> None:
    import torch
    from torch import nn

    space = tiny_space()
    arch = space.sample(random.Random(3))
    arch[2] = ZERO  # make sure a skipped layer is in there
    net = build_subnet(space, arch).eval()
    specs = space.layer_specs(arch)
    modules = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [s.name for s in specs] == list(modules)
    seen: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].shape[-1]))
             for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for spec in specs:
        module = modules[spec.name]
        if isinstance(module, nn.Conv2d):
            assert (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], module.groups) == (
                spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.groups), spec.name
            assert seen[spec.name] == spec.in_size, spec.name
        else:
            assert (module.in_features, module.out_features) == (spec.in_channels, spec.out_channels)
    assert sum(p.numel() for p in net.parameters()) == space.params(arch)
    assert not any(s.block == 2 for s in specs)


def test_candidate_costs_add_up_to_the_architecture_cost() -> None:
    space = tiny_space()

    def macs(specs) -> float:
        return float(sum(s.macs for s in specs))

    costs = space.candidate_costs(macs)
    fixed = space.fixed_cost(macs)
    rng = random.Random(0)
    for _ in range(5):
        arch = space.sample(rng)
        one_hot = [[1.0 if op == chosen else 0.0 for op in layer.candidates]
                   for layer, chosen in zip(space.layers, arch)]
        assert expected_cost(one_hot, costs, fixed) == pytest.approx(space.macs(arch))
    # the zero op costs nothing; expand ratio and kernel size cost what their shapes say
    layer = space.layers[2]  # the second layer of stage 1: it has a shortcut
    row = dict(zip(layer.candidates, costs[2]))
    assert row[ZERO] == 0.0
    assert row["3x3_MBConv3"] < row["3x3_MBConv6"] and row["3x3_MBConv6"] < row["7x7_MBConv6"]
    uniform = [[1 / len(r)] * len(r) for r in costs]
    assert expected_cost(uniform, costs, fixed) == pytest.approx(fixed + sum(sum(r) / len(r) for r in costs))
    with pytest.raises(ValueError, match="layer 0: 2 probabilities for 6 costs"):
        expected_cost([[0.5, 0.5]] + uniform[1:], costs)


def test_derived_arch_record_round_trips(tmp_path) -> None:
    space = ProxylessSpace.from_preset("proxyless_cifar", width_mult=0.5, stage_depths=[1, 1, 2, 1, 1, 1], candidate_ops=DEFAULT_CANDIDATES[:4] + [ZERO])
    arch = space.sample(random.Random(1))
    path = tmp_path / "derived_arch.json"
    path.write_text(json.dumps(derived_arch_record(space, arch, expected_cost=1.5)))
    loaded_space, ops = load_derived_arch(path)
    assert loaded_space == space and ops == arch
    assert load_derived_arch(path, num_classes=100)[0].num_classes == 100
    record = json.loads(path.read_text())
    record["space"]["name"] = "nope"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="derived architecture names space 'nope'"):
        load_derived_arch(path)
    with pytest.raises(ValueError, match="no derived architecture file"):
        load_derived_arch(tmp_path / "missing.json")


def test_space_module_does_not_import_torch() -> None:
    code = ("import sys; import lightning_nas.spaces.proxyless as s; s.ProxylessSpace().layer_specs("
            "s.ProxylessSpace().uniform_op('3x3_MBConv6')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
