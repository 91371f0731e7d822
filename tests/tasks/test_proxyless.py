"""The ProxylessNAS search task: cost tables, latency losses, the search loop and its artifacts."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lightning_nas.errors import RecipeError
from lightning_nas.spaces.proxyless import ZERO, ProxylessSpace, expected_cost
from lightning_nas.tasks.proxyless import ProxylessSearchTask, load_derived_model
from lightning_nas.tasks.proxyless_costs import (
    CostTable,
    accelerator_table,
    flops_table,
    measured_latency_table,
)

TINY = {"name": "proxyless", "num_classes": 10, "resolution": 32, "width_mult": 0.25,
        "stage_depths": [1, 2, 1, 1, 2, 1]}


def tiny_task(**arguments) -> ProxylessSearchTask:
    return ProxylessSearchTask(space=dict(TINY), **{"cost": "flops", **arguments})


def random_table(space: ProxylessSpace, seed: int = 0) -> CostTable:
    rng = random.Random(seed)
    return CostTable("latency", "ms", 1.25, [[0.0 if op == ZERO else rng.uniform(0.5, 3.0) for op in layer.candidates]
                                             for layer in space.layers])


def test_expected_latency_is_the_probability_weighted_table_sum() -> None:
    task = tiny_task()
    table = random_table(task.space)
    task.set_cost_table(table)
    torch.manual_seed(0)
    with torch.no_grad():
        for alpha in task.supernet.arch_parameters():
            alpha.copy_(torch.randn_like(alpha) * 2)
    probs = [torch.softmax(a.detach().double(), 0).tolist() for a in task.supernet.arch_parameters()]
    by_hand = table.fixed + sum(p * c for p_row, c_row in zip(probs, table.costs) for p, c in zip(p_row, c_row))
    expected = task.expected_cost()
    assert float(expected) == pytest.approx(by_hand, rel=1e-5)
    assert float(expected) == pytest.approx(expected_cost(probs, table.costs, table.fixed), rel=1e-5)
    # its gradient: dE/dalpha_lj = p_lj (c_lj - E_l), pushing probability towards cheaper ops
    expected.backward()
    for alpha, p_row, c_row in zip(task.supernet.arch_parameters(), probs, table.costs):
        layer_mean = sum(p * c for p, c in zip(p_row, c_row))
        analytic = torch.tensor([p * (c - layer_mean) for p, c in zip(p_row, c_row)])
        assert torch.allclose(alpha.grad.double(), analytic.double(), atol=1e-5)
    # the default target: target_ratio x the expected cost of the uniform distribution
    uniform = table.fixed + sum(sum(row) / len(row) for row in table.costs)
    assert task.target == pytest.approx(0.8 * uniform)


def test_flops_and_accelerator_tables_cost_what_the_layer_specs_say() -> None:
    from lightning_nas.hardware.accelerator import BitFusionModel

    space = ProxylessSpace(**{k: v for k, v in TINY.items() if k != "name"})
    arch = space.sample(random.Random(2))
    flops = flops_table(space)
    assert flops.arch_cost(space, arch) == pytest.approx(space.macs(arch) / 1e6)
    accelerator = accelerator_table(space, bits=8, arguments={"rows": 16})
    specs = space.layer_specs(arch)
    reference = BitFusionModel(rows=16).network_cost(specs, {s.name: (8, 8) for s in specs})[0]
    assert accelerator.arch_cost(space, arch) == pytest.approx(reference, rel=1e-9)
    for table in (flops, accelerator):
        for layer, row in zip(space.layers, table.costs):
            assert all((c == 0.0) == (op == ZERO) for op, c in zip(layer.candidates, row))


def _work_ms(module, example_input) -> float:
    """A deterministic stand-in for a timing: proportional to the module's size and input."""
    parameters = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else 1
    return 1e-6 * (parameters + 1) * example_input[0].numel()


def test_measured_latency_table_is_cached_keyed_by_shape_and_resumable(tmp_path: Path, monkeypatch) -> None:
    import lightning_nas.deploy.latency as latency
    from lightning_nas.hardware.latency_table import LatencyTable
    from lightning_nas.tasks.proxyless_costs import latency_units

    calls: list[int] = []

    def fake_measure(module, example_input, warmup=10, repeats=50, threads=1):
        calls.append(1)
        ms = _work_ms(module, example_input)
        return {"median_ms": ms, "mean_ms": ms, "std_ms": 0.0, "min_ms": ms}

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    space = ProxylessSpace(**{**{k: v for k, v in TINY.items() if k != "name"}, "stage_depths": [1, 3, 1, 1, 1, 1]})
    fixed, layers = latency_units(space)
    keys = {u.key for u in fixed} | {u.key for row in layers for u in row.values()}
    assert {u.key for u in layers[2].values()} == {u.key for u in layers[3].values()}  # equal shapes, one key
    assert len(keys) == len(fixed) + sum(len(row) for row in layers) - len(layers[3])
    path = tmp_path / "table.json"
    table = measured_latency_table(space, path, context="isolated")
    assert len(calls) == len(keys)
    saved = LatencyTable.load(path)
    assert saved.keys("fp32") == keys and saved.meta["context"] == "isolated"
    assert any(k.startswith("expanded_conv-input:") and "-idskip:1-" in k for k in keys)
    for layer, row in zip(space.layers, table.costs):
        assert all((c == 0.0) == (op == ZERO) for op, c in zip(layer.candidates, row))
    # a second search reuses the file; a torn run measures only what is missing
    calls.clear()
    again = measured_latency_table(space, path, context="isolated")
    assert calls == [] and again.costs == table.costs and again.fixed == table.fixed
    record = json.loads(path.read_text())
    for key in sorted(record["entries"]["fp32"])[:3]:
        del record["entries"]["fp32"][key]
    path.write_text(json.dumps(record))
    resumed = measured_latency_table(space, path, context="isolated")
    assert len(calls) == 3 and resumed.costs == table.costs
    assert table.costs[2] == table.costs[3]
    # another measurement protocol does not silently mix into the file
    with pytest.raises(ValueError, match="was measured with other settings"):
        measured_latency_table(space, path, context="isolated", threads=2)


def test_network_context_times_every_unit_inside_profiling_networks(tmp_path: Path, monkeypatch) -> None:
    from lightning_nas.hardware import profiling

    chains: list[int] = []

    def fake_chain(runners, x, *, warmup, repeats, threads=None, realtime=False):
        chains.append(len(runners))
        times, y = [], x
        with torch.no_grad():
            for run in runners:
                times.append([_work_ms(run, y)] * repeats)
                y = run(y)
        return times

    monkeypatch.setattr(profiling, "time_chain", fake_chain)
    space = ProxylessSpace(**{k: v for k, v in TINY.items() if k != "name"})
    table = measured_latency_table(space, tmp_path / "t.json", repeats=4)
    # one network per candidate of the widest layer (every network runs every layer once)
    assert len(chains) == max(sum(op != ZERO for op in layer.candidates) for layer in space.layers)
    assert set(chains) == {space.num_layers + 5}
    assert all(c > 0 for layer, row in zip(space.layers, table.costs) for op, c in zip(layer.candidates, row)
               if op != ZERO)


def test_real_latency_measurement_of_a_tiny_space(tmp_path: Path) -> None:
    space = ProxylessSpace(num_classes=10, resolution=32, width_mult=0.25, stage_depths=[1, 1, 1, 1, 1, 1],
                           candidate_ops=["3x3_MBConv3", "7x7_MBConv6"])
    table = measured_latency_table(space, tmp_path / "t.json", warmup=1, repeats=3)
    assert table.fixed > 0 and all(c > 0 for row in table.costs for c in row)
    assert table.unit == "ms" and table.kind == "latency"


def test_latency_losses_follow_their_formulas() -> None:
    ce, expected = torch.tensor(1.7), torch.tensor(12.0)
    task = tiny_task(latency_loss="multiplicative", target=10.0, beta=0.3)
    task.set_cost_table(random_table(task.space))
    assert float(task.arch_loss(ce, expected)) == pytest.approx(1.7 * (math.log(12) / math.log(10)) ** 0.3)
    task = tiny_task(latency_loss="additive", target=10.0, latency_lambda=0.5)
    task.set_cost_table(random_table(task.space))
    assert float(task.arch_loss(ce, expected)) == pytest.approx(1.7 + 0.5 * (12 - 10) / 10)
    task = tiny_task(latency_loss="none", target=10.0)
    assert float(task.arch_loss(ce, expected)) == pytest.approx(1.7)
    with pytest.raises(RecipeError, match="target must exceed 1 in the cost's unit"):
        tiny_task(latency_loss="multiplicative", target=0.5).set_cost_table(random_table(task.space))


@pytest.mark.parametrize("form, weights", [("multiplicative", ("beta", 0.0, 2.0)),
                                           ("additive", ("latency_lambda", 0.0, 2.0))])
def test_a_larger_latency_weight_gives_a_cheaper_architecture_distribution(form: str, weights: tuple) -> None:
    """Architecture steps with a fixed task loss: only the weight of the latency term differs."""
    name, low, high = weights
    results = {}
    for weight in (low, high):
        task = tiny_task(latency_loss=form, target=2.0, **{name: weight})
        task.set_cost_table(random_table(task.space, seed=3))
        optimizer = torch.optim.Adam(task.supernet.arch_parameters(), lr=0.05, betas=(0.0, 0.999))
        for _ in range(30):
            optimizer.zero_grad(set_to_none=True)
            task.arch_loss(torch.tensor(1.5), task.expected_cost()).backward()
            optimizer.step()
        results[weight] = float(task.expected_cost())
    assert results[high] < results[low] - 0.5


def fit_search(tmp_path: Path, **arguments) -> ProxylessSearchTask:
    import lightning.pytorch as pl

    from lightning_nas.data.digits import DigitsDataModule

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=16, num_workers=0, holdout_size=48, augment=False)
    task = tiny_task(warmup_epochs=1, arch_update_every=1, arch_lr=0.05, **arguments)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    from lightning_nas.nn.threads import torch_threads

    with torch_threads(1):  # tiny tensors: a second thread only adds synchronisation on a shared machine
        trainer.fit(task, datamodule=data)
    return task


def test_raising_the_latency_weight_lowers_the_expected_latency_of_the_search_result(tmp_path: Path) -> None:
    light = fit_search(tmp_path / "light", latency_loss="additive", latency_lambda=0.0, target=2.0)
    heavy = fit_search(tmp_path / "heavy", latency_loss="additive", latency_lambda=20.0, target=2.0)
    uniform = flops_table(heavy.space)
    uniform_cost = uniform.fixed + sum(sum(r) / len(r) for r in uniform.costs)
    assert float(heavy.expected_cost()) < float(light.expected_cost())
    assert float(heavy.expected_cost()) < uniform_cost
    # the artifacts of the search
    record = json.loads((tmp_path / "heavy" / "derived_arch.json").read_text())
    assert record["ops"] == heavy.supernet.derive()
    assert record["expected_cost"] == pytest.approx(float(heavy.expected_cost()), rel=1e-5)
    assert record["derived_cost"] == pytest.approx(heavy.space.macs(record["ops"]) / 1e6, rel=1e-6)
    assert record["cost"]["kind"] == "flops" and record["cost"]["unit"] == "MMACs"
    assert [len(p) for p in record["probabilities"]] == [len(c) for c in record["candidates"]]
    assert all(sum(p) == pytest.approx(1.0, abs=1e-4) for p in record["probabilities"])
    net = load_derived_model(tmp_path / "heavy" / "derived_model.pt")
    assert net.ops == record["ops"]
    heavy.supernet.fix()
    heavy.supernet.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), heavy.supernet(x), atol=1e-5)  # the search weights, copied
    history = [json.loads(line) for line in (tmp_path / "heavy" / "arch_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]


def test_derived_model_builder_trains_the_architecture_from_scratch(tmp_path: Path) -> None:
    from lightning_nas.spaces.proxyless import derived_arch_record
    from lightning_nas.tasks.proxyless_models import proxyless_derived

    space = ProxylessSpace(**{k: v for k, v in TINY.items() if k != "name"})
    arch = space.sample(random.Random(5))
    path = tmp_path / "derived_arch.json"
    path.write_text(json.dumps(derived_arch_record(space, arch)))
    net = proxyless_derived(str(path), num_classes=7)
    assert net.ops == arch and net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # another width keeps the ops; at 0.25 stages 2 and 3 round to equal widths, at 0.5 they do not,
    # so a 'zero' there no longer has a shortcut and the override is refused
    arch[4] = ZERO
    path.write_text(json.dumps(derived_arch_record(space, arch)))
    with pytest.raises(ValueError, match=r"layer 4 \(stage 3, .*no shortcut\): op 'zero' is not a candidate"):
        proxyless_derived(str(path), width_mult=0.5)
    arch[4] = "5x5_MBConv3"
    path.write_text(json.dumps(derived_arch_record(space, arch)))
    wider = proxyless_derived(str(path), num_classes=7, width_mult=0.5)
    assert wider.ops == arch and wider.space.width_mult == 0.5
    assert sum(p.numel() for p in wider.parameters()) > sum(p.numel() for p in net.parameters())


@pytest.mark.slow
def test_smoke_recipes_search_then_train(tmp_path: Path) -> None:
    import time

    from lightning_nas.cli import main

    started = time.perf_counter()
    assert main(["fit", str(REPO / "recipes" / "proxylessnas.yaml"), "--smoke", f"vars.runs={tmp_path}"]) == 0
    assert time.perf_counter() - started < 60
    record = json.loads((tmp_path / "proxylessnas" / "derived_arch.json").read_text())
    assert len(record["ops"]) == record["num_layers"]
    assert main(["fit", str(REPO / "recipes" / "proxylessnas_train.yaml"), "--smoke", f"vars.runs={tmp_path}"]) == 0
