from __future__ import annotations

import numpy as np
import pytest

from lightning_nas.search import emq_evolution
from lightning_nas.search.emq_evolution import Benchmark, ProxyEvolution, rank_correlations, split_benchmark
from lightning_nas.spaces.emq_programs import LayerStatistics, Program, program_table, score_configs

BITS = (2, 3, 4)


def stats_of(layers: int = 6, seed: int = 0) -> LayerStatistics:
    rng = np.random.default_rng(seed)
    tensors = []
    for _ in range(layers):
        w = rng.normal(size=(4, 6))
        w[0, 0] = 0.0  # a zero weight: invert(weight) is infinite
        perturb = [w * rng.uniform(0.2, 0.6) ** b for b in BITS]
        tensors.append({"weight": w, "grad": rng.normal(size=w.shape), "hessian": rng.random(w.shape),
                        "act": rng.normal(size=(6, 10)), "perturb": perturb, "qweight": [w - p for p in perturb]})
    scalars = {name: rng.random(layers) for name in ("params", "macs", "hessian_trace", "ompq_gamma")}
    return LayerStatistics([f"l{i}" for i in range(layers)], BITS, tensors, scalars)


TARGET = Program(("perturb", "hessian"), (("square",), ()), "multiply")


def bench_of(stats: LayerStatistics, configs: int = 120, seed: int = 0) -> Benchmark:
    """Accuracy = minus a known program's score."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(BITS), size=(configs, stats.num_layers))
    accuracy = -score_configs(program_table(TARGET, stats), index)
    return Benchmark(index, accuracy)


def test_split_is_disjoint_and_complete() -> None:
    bench = bench_of(stats_of())
    train, held = split_benchmark(bench, 0.5, seed=1)
    assert len(train) + len(held) == len(bench) and len(train) == 60
    rows = {tuple(r) for r in train.bit_index} | {tuple(r) for r in held.bit_index}
    assert len(rows) == len({tuple(r) for r in bench.bit_index})


def test_invalid_programs_are_rejected_before_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = stats_of()
    evolution = ProxyEvolution(stats, bench_of(stats), population=4)

    def no_scoring(*_args):
        raise AssertionError("a program that screening should reject reached full scoring")

    monkeypatch.setattr(emq_evolution, "spearman", no_scoring)
    rejected = {
        "shape": Program(("weight", "weight"), ((), ()), "matmul"),  # [4,6] @ [4,6]
        "nan_inf": Program(("weight", "bits"), (("invert",), ()), "multiply"),  # 1 / 0
        "constant": Program(("weight", "weight"), ((), ()), "subtract"),  # 0 for every config
    }
    for reason, program in rejected.items():
        assert evolution.score(program) is None, reason
        assert evolution.rejected[reason] == 1, reason
    assert evolution.evaluated == 0
    monkeypatch.undo()
    first = Program(("perturb", "perturb"), ((), ()), "add")
    assert evolution.score(first) is not None
    # the same structure again (operands of add swapped, identity ops added)
    assert evolution.score(Program(("perturb", "perturb"), (("identity",), ()), "add")) is None
    assert evolution.rejected["duplicate"] == 1
    # sum(perturb - weight) = sum(perturb) - const: an affine transform of the first program's scores
    assert evolution.score(Program(("perturb", "weight"), ((), ()), "subtract")) is None
    assert evolution.rejected["equivalent"] == 1
    assert evolution.evaluated == 1


def test_fitness_is_spearman_on_the_training_configs() -> None:
    stats = stats_of()
    bench = bench_of(stats)
    evolution = ProxyEvolution(stats, bench, population=4)
    candidate = evolution.score(TARGET)
    assert candidate is not None and candidate.fitness == pytest.approx(-1.0)
    correlations = rank_correlations(-candidate.table, bench)
    assert correlations["spearman"] == pytest.approx(1.0) and correlations["kendall"] == pytest.approx(1.0)


def test_evolution_improves_keeps_its_size_and_is_deterministic() -> None:
    stats = stats_of()
    train, held = split_benchmark(bench_of(stats), 0.5, seed=0)
    results = [ProxyEvolution(stats, train, population=8, seed=3).run(150) for _ in range(2)]
    first, second = results
    assert str(first.best.program) == str(second.best.program) and first.best_by_generation == second.best_by_generation
    assert len(first.population) == 8
    assert all(b >= a for a, b in zip(first.best_by_generation, first.best_by_generation[1:]))
    initial = ProxyEvolution(stats, train, population=8, seed=3).initial_population()
    assert first.best.fitness >= max(c.fitness for c in initial)
    assert first.best.fitness > 0.9  # the target is in the space, so a close program is found
    assert sum(first.rejected.values()) > 0 and first.evaluated > 8


def test_the_better_of_child_and_fresh_program_joins_and_the_worst_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = stats_of()
    bench = bench_of(stats)
    flipped = Benchmark(bench.bit_index, -bench.accuracy)  # TARGET now has Spearman +1
    evolution = ProxyEvolution(stats, flipped, population=3, seed=0)
    seeds = [Program(("weight", "bits"), (("abs",), ()), "multiply"),
             Program(("grad", "perturb"), (("l1",), ("frobenius",)), "multiply"),
             Program(("qweight", "hessian"), (("square",), ("mean",)), "add")]
    fresh = Program(("act", "perturb"), (("std",), ("l1",)), "add")
    monkeypatch.setattr(evolution, "child", lambda population: TARGET)
    monkeypatch.setattr(emq_evolution, "random_program", lambda rng, chain_length: fresh)
    initial = evolution.initial_population(seeds)
    fitness = {c.program.key(): c.fitness for c in initial}
    assert len(fitness) == 3 and len(set(fitness.values())) == 3
    evolution = ProxyEvolution(stats, flipped, population=3, seed=0)
    monkeypatch.setattr(evolution, "child", lambda population: TARGET)
    result = evolution.run(1, seeds=seeds)
    keys = {c.program.key() for c in result.population}
    worst = min(fitness, key=fitness.get)
    assert TARGET.key() in keys and fresh.key() not in keys and worst not in keys and len(keys) == 3
    assert result.best.program == TARGET and result.best.fitness == pytest.approx(1.0)


def test_program_space_evolution_and_allocation_import_without_torch() -> None:
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys\n"
            "import lightning_nas.spaces.emq_programs, lightning_nas.search.emq_evolution, "
            "lightning_nas.search.bit_allocation\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
