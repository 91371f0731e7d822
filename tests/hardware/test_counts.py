from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from lightning_nas.hardware.counts import BYTES_PER_FLOAT, CountTable, count_network, layer_bits
from lightning_nas.nn.builders import build_subnet
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.quant_policy import QuantPolicySpace


@pytest.fixture(scope="module")
def table(cifar_space: OFAMobileNetV3Space) -> CountTable:
    return CountTable(cifar_space, QuantPolicySpace())


def test_hardware_count_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import lightning_nas.hardware.counts, lightning_nas.hardware.accelerator\n"
        "import lightning_nas.hardware.cost_models, lightning_nas.recipe.profile_settings\n"
        "import lightning_nas.hardware.latency_table, lightning_nas.hardware.latency_keys\n"
        "import lightning_nas.hardware.latency_model, lightning_nas.hardware.latency_profile\n"
        "import lightning_nas.hardware.profiling, lightning_nas.hardware.latency_validation\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def independent_counts(space, config: dict, policy: dict | None, policy_space: QuantPolicySpace) -> dict:
    """Counts from a built network: torch's FLOP counter for MACs, the modules' parameters, and
    forward hooks (real output shapes) for BitOps; bits come from the policy by module name."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    net = build_subnet(space, config).eval()
    bits = layer_bits(space.layer_specs(config), policy, policy_space)
    bitops = 0.0
    size_bits = 0.0

    def hook(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            nonlocal bitops
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_output = module.in_features
            w, a = bits[name]
            bitops += output.numel() * per_output * w * a

        return record

    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
            size_bits += module.weight.numel() * bits[name][0]
            if module.bias is not None:
                size_bits += module.bias.numel() * 32
        elif isinstance(module, nn.BatchNorm2d):
            size_bits += (module.weight.numel() + module.bias.numel()) * 32
    x = torch.randn(1, 3, config["r"], config["r"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    for h in hooks:
        h.remove()
    macs = counter.get_total_flops() / 2
    params = sum(p.numel() for p in net.parameters())
    return {"macs": macs, "params": params, "bitops": bitops, "size_bytes": size_bits / 8}


@pytest.mark.parametrize("preset,resolutions", [("ofa_mbv3_cifar", None), ("ofa_mbv3", [128])])
def test_counts_agree_with_an_independent_count_of_the_built_network(preset, resolutions) -> None:
    space = OFAMobileNetV3Space.from_preset(preset, **({} if resolutions is None else {"resolutions": resolutions}))
    policy_space = QuantPolicySpace()
    rng = random.Random(5)
    # the largest network of the ImageNet layout is slow to build on 2 cores: one random subnet there
    configs = [space.sample(rng)] if resolutions else [space.largest(), space.smallest(), space.sample(rng)]
    policies = [policy_space.sample(rng, space.num_blocks), None, policy_space.sample(rng, space.num_blocks)]
    for config, policy in zip(configs, policies):
        ours = count_network(space, config, policy, policy_space).as_dict()
        theirs = independent_counts(space, config, policy, policy_space)
        for metric, value in theirs.items():
            assert ours[metric] == pytest.approx(value, rel=0.01), (metric, config, policy)


def test_known_totals_of_the_once_for_all_layout() -> None:
    space = OFAMobileNetV3Space()
    largest = count_network(space, space.largest())
    # the once-for-all paper's largest MobileNetV3 subnet: 566M MACs at 224, 7.7M parameters
    assert largest.macs == pytest.approx(566e6, rel=0.01)
    assert largest.params == pytest.approx(7.7e6, rel=0.01)
    assert largest.bitops == largest.macs * 32 * 32
    assert largest.size_bytes == largest.params * BYTES_PER_FLOAT


def test_quantization_lowers_bitops_and_size_by_the_bit_ratio(cifar_space) -> None:
    policy_space = QuantPolicySpace(bit_choices=[4, 8], fixed_bits=8)
    config = cifar_space.largest()
    eight = count_network(cifar_space, config, policy_space.uniform(8, cifar_space.num_blocks), policy_space)
    four = count_network(cifar_space, config, policy_space.uniform(4, cifar_space.num_blocks), policy_space)
    full = count_network(cifar_space, config)
    assert eight.macs == four.macs == full.macs
    assert eight.bitops == full.macs * 64
    specs = cifar_space.layer_specs(config)
    in_policy = sum(s.macs for s in specs if s.block is not None and s.role in ("pw_expand", "dw", "pw_project"))
    assert eight.bitops - four.bitops == in_policy * (64 - 16)
    assert four.size_bytes < eight.size_bytes < full.size_bytes


def test_batched_counts_equal_the_per_config_definition(cifar_space, table) -> None:
    policy_space = table.policy_space
    rng = random.Random(11)
    configs = [cifar_space.sample(rng) for _ in range(60)] + [cifar_space.largest(), cifar_space.smallest()]
    policies = [policy_space.sample(rng, cifar_space.num_blocks) if i % 2 else None for i in range(len(configs))]
    out = table.evaluate(configs, policies)
    assert set(out) == {"macs", "params", "bitops", "size_bytes"}
    for i, (config, policy) in enumerate(zip(configs, policies)):
        reference = count_network(cifar_space, config, policy, policy_space)
        assert out["macs"][i] == reference.macs
        assert out["params"][i] == reference.params
        assert out["bitops"][i] == reference.bitops
        assert out["size_bytes"][i] == pytest.approx(reference.size_bytes, abs=1e-6)
    # without policies every candidate is full precision
    plain = table.evaluate(configs[:5])
    assert list(plain["bitops"]) == [count_network(cifar_space, c).bitops for c in configs[:5]]


def test_batched_counts_reject_bad_candidates_by_index(cifar_space, table) -> None:
    good = cifar_space.smallest()
    bad = {**good, "ks": list(good["ks"])}
    bad["ks"][3] = 4
    with pytest.raises(ValueError, match=r"candidate 1: ks\[3\] = 4 is not allowed; choose from \[3, 5, 7\]"):
        table.evaluate([good, bad])
    with pytest.raises(ValueError, match=r"candidate 0: r = 30 is not allowed"):
        table.evaluate([{**good, "r": 30}])
    with pytest.raises(ValueError, match="ks must have 20 entries"):
        table.evaluate([{**good, "ks": [3] * 19}])
    policy = table.policy_space.uniform(8, cifar_space.num_blocks)
    policy["dw_a"][0] = 5
    with pytest.raises(ValueError, match=r"candidate 0: policy\['dw_a'\]\[0\] = 5 is not allowed"):
        table.evaluate([good], [policy])
    with pytest.raises(ValueError, match="got 1 policies for 2 candidates"):
        table.evaluate([good, good], [policy])


def test_batched_counts_score_over_ten_thousand_candidates_per_second(cifar_space, table) -> None:
    rng = random.Random(0)
    configs = [cifar_space.sample(rng) for _ in range(200)] * 25
    policies = [table.policy_space.sample(rng, cifar_space.num_blocks) for _ in range(200)] * 25
    table.evaluate(configs[:10], policies[:10])
    started = time.perf_counter()
    table.evaluate(configs, policies)
    assert len(configs) / (time.perf_counter() - started) > 10_000
