from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_nas.errors import RecipeError
from lightning_nas.hardware.accelerator import BitFusionModel
from lightning_nas.hardware.cost_models import (
    BitFusionCostModel,
    CostModel,
    CountsCostModel,
    LatencyTableCostModel,
    evaluate_all,
)
from lightning_nas.hardware.counts import count_network, layer_bits
from lightning_nas.hardware.latency_keys import UnitDecomposition, space_units
from lightning_nas.hardware.latency_table import LatencyTable
from lightning_nas.recipe.signature import signature_of
from lightning_nas.recipe.validate import validate_arguments
from lightning_nas.spaces.quant_policy import QuantPolicySpace

SPACE = {"name": "ofa_mbv3_cifar"}


@pytest.fixture(scope="module")
def counts() -> CountsCostModel:
    return CountsCostModel(SPACE)


@pytest.fixture(scope="module")
def bitfusion() -> BitFusionCostModel:
    return BitFusionCostModel(SPACE, frequency_mhz=400.0)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory, counts: CountsCostModel) -> Path:
    """A synthetic two-precision table covering the space (int8 entries are half of fp32)."""
    units = space_units(counts.space)
    fp32 = {u.key: {"count": 5, "mean": 0.02 * (i + 1), "median": 0.01 * (i + 1), "std": 0.0} for i, u in enumerate(units)}
    int8 = {k: {key: v / 2 if key != "count" else v for key, v in e.items()} for k, e in fp32.items()}
    path = tmp_path_factory.mktemp("table") / "latency_table.json"
    return LatencyTable({"threads": 1}, {"fp32": fp32, "int8": int8}).save(path)


def sample(space, n: int, seed: int = 0, quantized_every: int = 2) -> tuple[list[dict], list[dict | None]]:
    rng = random.Random(seed)
    policy_space = QuantPolicySpace()
    configs = [space.sample(rng) for _ in range(n)]
    policies = [policy_space.sample(rng, space.num_blocks) if i % quantized_every else None for i in range(n)]
    return configs, policies


def test_every_cost_model_has_the_common_interface(counts, bitfusion, table_path) -> None:
    models = [counts, bitfusion, LatencyTableCostModel(SPACE, str(table_path))]
    configs, policies = sample(counts.space, 7)
    for model in models:
        assert isinstance(model, CostModel)
        out = model.evaluate(configs, policies)
        assert tuple(out) == model.metrics
        assert all(isinstance(v, np.ndarray) and v.shape == (7,) for v in out.values())
        one = model.evaluate_one(configs[1], policies[1])
        assert one == pytest.approx({k: float(v[1]) for k, v in out.items()})
    assert model.evaluate([], None)["latency_ms"].shape == (0,)


def test_counts_model_matches_the_per_config_counts(counts) -> None:
    configs, policies = sample(counts.space, 30, seed=4)
    out = counts.evaluate(configs, policies)
    for i, (config, policy) in enumerate(zip(configs, policies)):
        reference = count_network(counts.space, config, policy, counts.policy_space)
        assert (out["macs"][i], out["params"][i], out["bitops"][i]) == (reference.macs, reference.params, reference.bitops)
        assert out["size_bytes"][i] == pytest.approx(reference.size_bytes)


def test_bitfusion_model_matches_the_layerwise_accelerator(bitfusion) -> None:
    space, policy_space = bitfusion.space, bitfusion.policy_space
    configs, policies = sample(space, 40, seed=2, quantized_every=3)
    out = bitfusion.evaluate(configs, policies)
    accelerator = BitFusionModel(frequency_mhz=400.0)
    for i, (config, policy) in enumerate(zip(configs, policies)):
        specs = space.layer_specs(config)
        latency, energy = accelerator.network_cost(specs, layer_bits(specs, policy, policy_space))
        assert out["latency_ms"][i] == pytest.approx(latency, rel=1e-9)
        assert out["energy_mj"][i] == pytest.approx(energy, rel=1e-9)
    # fewer bits never cost more: a uniform 4-bit policy is cheaper than 8-bit, and both beat fp32
    config = space.largest()
    cost = {bits: bitfusion.evaluate_one(config, policy_space.uniform(bits, space.num_blocks)) for bits in (4, 6, 8)}
    full = bitfusion.evaluate_one(config)
    assert cost[4]["latency_ms"] <= cost[6]["latency_ms"] <= cost[8]["latency_ms"] < full["latency_ms"]
    assert cost[4]["energy_mj"] < cost[6]["energy_mj"] < cost[8]["energy_mj"] < full["energy_mj"]


def test_latency_table_model_sums_the_table_and_picks_precision(counts, table_path) -> None:
    space = counts.space
    table = LatencyTable.load(table_path)
    configs, policies = sample(space, 20, seed=9)
    decomposition = UnitDecomposition(space)
    expected = [sum(table.value("fp32", u.key) for u in decomposition.units(c)) for c in configs]
    fp32 = LatencyTableCostModel(SPACE, str(table_path))
    assert fp32.evaluate(configs)["latency_ms"] == pytest.approx(expected)
    assert fp32.evaluate(configs, policies)["latency_ms"] == pytest.approx(expected)  # fixed precision
    int8 = LatencyTableCostModel(SPACE, str(table_path), precision="int8")
    assert int8.evaluate(configs)["latency_ms"] == pytest.approx(np.array(expected) / 2)
    mean = LatencyTableCostModel(SPACE, str(table_path), stat="mean")
    assert mean.evaluate(configs)["latency_ms"] == pytest.approx(np.array(expected) * 2)
    auto = LatencyTableCostModel(SPACE, str(table_path), precision="auto")
    got = auto.evaluate(configs, policies)["latency_ms"]
    want = [e / 2 if p is not None else e for e, p in zip(expected, policies)]
    assert got == pytest.approx(want)
    assert auto.evaluate(configs)["latency_ms"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="precision 'fp16' must be one of"):
        LatencyTableCostModel(SPACE, str(table_path), precision="fp16")


def test_latency_table_model_reads_once_for_all_yaml(tmp_path: Path) -> None:
    spec = {"name": "ofa_mbv3", "resolutions": [224]}
    model = CountsCostModel(spec)  # builds the space from the spec, as a recipe does
    units = space_units(model.space)
    path = tmp_path / "224_lookup_table.yaml"
    path.write_text(yaml.safe_dump({u.key: {"count": 10, "mean": 1.0, "std": 0.1} for u in units}), encoding="utf-8")
    latency = LatencyTableCostModel(spec, str(path))
    config = model.space.smallest()
    assert latency.evaluate_one(config)["latency_ms"] == len(UnitDecomposition(model.space).units(config))


def test_evaluate_all_merges_metrics(counts, bitfusion, table_path) -> None:
    configs, policies = sample(counts.space, 3)
    merged = evaluate_all([counts, bitfusion], configs, policies)
    assert set(merged) == {"macs", "params", "bitops", "size_bytes", "latency_ms", "energy_mj"}
    with pytest.raises(ValueError, match="two cost models report 'latency_ms'"):
        evaluate_all([bitfusion, LatencyTableCostModel(SPACE, str(table_path))], configs, policies)


@pytest.mark.parametrize("name", ["counts", "bitfusion", "table"])
def test_batched_evaluation_scores_over_ten_thousand_candidates_per_second(name, counts, bitfusion, table_path) -> None:
    model = {"counts": counts, "bitfusion": bitfusion}.get(name) or LatencyTableCostModel(SPACE, str(table_path), "auto")
    configs, policies = sample(counts.space, 250, seed=1)
    configs, policies = configs * 20, policies * 20
    model.evaluate(configs[:10], policies[:10])
    started = time.perf_counter()
    model.evaluate(configs, policies)
    assert len(configs) / (time.perf_counter() - started) > 10_000


@pytest.mark.parametrize("target,arguments", [
    ("CountsCostModel", {"space": SPACE, "bit_choices": [2, 4, 8], "fixed_bits": 8}),
    ("BitFusionCostModel", {"space": SPACE, "rows": 16, "frequency_mhz": 250.0, "dram_pj_per_bit": 10.0}),
    ("LatencyTableCostModel", {"space": SPACE, "table": "TABLE", "precision": "int8", "resolutions": [32]}),
])
def test_constructors_validate_as_recipe_components(target, arguments, table_path) -> None:
    arguments = {k: (str(table_path) if v == "TABLE" else v) for k, v in arguments.items()}
    signature = signature_of(f"lightning_nas.hardware.cost_models:{target}")
    validate_arguments(signature, arguments, "cost_model")
    with pytest.raises(RecipeError, match="unknown key"):
        validate_arguments(signature, {**arguments, "bogus": 1}, "cost_model")


def test_a_missing_table_file_fails_recipe_validation() -> None:
    signature = signature_of("lightning_nas.hardware.cost_models:LatencyTableCostModel")
    with pytest.raises(RecipeError) as error:
        validate_arguments(signature, {"space": SPACE, "table": "no/such/table.json"}, "cost_model")
    assert "table" in error.value.render()


@pytest.mark.parametrize("name", ["proxyless_cifar", "nb201"])
def test_cost_models_refuse_a_space_they_cannot_tabulate(name: str) -> None:
    # block tables need an elastic (once-for-all style) space: anything else is the recipe's mistake
    with pytest.raises(RecipeError, match="once-for-all style spaces") as error:
        CountsCostModel(space={"name": name})
    assert error.value.key == "space" and error.value.given == {"name": name}
