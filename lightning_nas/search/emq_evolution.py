"""EMQ's evolution of training-free proxies for mixed-precision quantization.

Fitness of a program is the Spearman correlation between its scores and the measured accuracies
of the benchmark's training configurations. Statistics are computed once per network
(:class:`~lightning_nas.spaces.emq_programs.LayerStatistics`), so a program costs one evaluation
per (layer, bit width) and a gather over all configurations.

One generation (EMQ's diversity-prompting selection): parents come from the top half of the
population; a child is a crossover of two parents (probability 0.5) and/or a mutation (probability
0.5, and always when no crossover happened, so the child differs from its parent); a fresh random
program competes with the child: the better of the two joins the population and the worst member
leaves. Before full scoring every candidate passes compatibility screening: rejected are programs
structurally equal to one already seen, programs whose operations do not fit the shapes (the first
layer is tried first, so most fail in microseconds), programs with a NaN or infinite value, programs
constant over the first screening configurations, and programs whose standardised scores on those
configurations equal a seen program's (an affine transform of it ranks every configuration the
same way).

This module must not import torch.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from ..spaces.emq_programs import (
    InvalidProgram,
    LayerStatistics,
    Program,
    crossover,
    evaluate_layer,
    mutate,
    program_table,
    random_program,
    score_configs,
)

REJECTIONS = ("duplicate", "shape", "nan_inf", "constant", "equivalent")


@dataclass(frozen=True)
class Benchmark:
    """Configurations as indices into the bit choices (``[configs, layers]``) and their top-1."""

    bit_index: np.ndarray
    accuracy: np.ndarray

    def __len__(self) -> int:
        return len(self.accuracy)

    def subset(self, rows: np.ndarray) -> Benchmark:
        return Benchmark(self.bit_index[rows], self.accuracy[rows])


def split_benchmark(bench: Benchmark, train_fraction: float, seed: int) -> tuple[Benchmark, Benchmark]:
    """A seeded random split into a training part (the fitness) and a held-out part (the report)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = np.random.default_rng(seed).permutation(len(bench))
    cut = max(2, min(len(bench) - 2, int(round(train_fraction * len(bench)))))
    return bench.subset(np.sort(order[:cut])), bench.subset(np.sort(order[cut:]))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    value = scipy_stats.spearmanr(x, y).statistic
    return float(value) if np.isfinite(value) else float("nan")


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    value = scipy_stats.kendalltau(x, y).statistic
    return float(value) if np.isfinite(value) else float("nan")


def rank_correlations(table: np.ndarray, bench: Benchmark) -> dict[str, float]:
    scores = score_configs(table, bench.bit_index)
    return {"spearman": spearman(scores, bench.accuracy), "kendall": kendall(scores, bench.accuracy)}


@dataclass
class Candidate:
    program: Program
    fitness: float
    table: np.ndarray = field(repr=False)


@dataclass
class EvolutionResult:
    best: Candidate
    population: list[Candidate]
    #: Best training fitness after each generation.
    best_by_generation: list[float]
    rejected: dict[str, int]
    evaluated: int
    seconds: float
    generations: int

    def summary(self) -> dict[str, Any]:
        return {"best_program": self.best.program.to_dict(), "best_train_spearman": self.best.fitness,
                "generations": self.generations, "evaluated": self.evaluated, "rejected": self.rejected,
                "seconds": self.seconds,
                "seconds_per_generation": self.seconds / max(self.generations, 1)}


class ProxyEvolution:
    """Evolve a program maximising the Spearman correlation on ``train``."""

    def __init__(self, stats: LayerStatistics, train: Benchmark, population: int = 20, chain_length: int = 2,
                 screen_configs: int = 20, crossover_prob: float = 0.5, mutation_prob: float = 0.5,
                 init_tries: int = 10000, seed: int = 0) -> None:
        if population < 2:
            raise ValueError(f"population must be at least 2, got {population}")
        if len(train) < 3:
            raise ValueError(f"the training part of the benchmark needs at least 3 configurations, has {len(train)}")
        self.stats, self.train = stats, train
        self.population_size, self.chain_length = population, chain_length
        self.screen_rows = np.arange(min(screen_configs, len(train)))
        self.crossover_prob, self.mutation_prob = crossover_prob, mutation_prob
        self.init_tries = init_tries
        self.rng = random.Random(seed)
        self.seen: set[str] = set()
        self.signatures: set[bytes] = set()
        self.rejected: Counter[str] = Counter({reason: 0 for reason in REJECTIONS})
        self.evaluated = 0

    def screen(self, program: Program) -> tuple[str | None, np.ndarray | None]:
        """(reason for rejection or None, the program's table when it passed)."""
        key = program.key()
        if key in self.seen:
            return "duplicate", None
        self.seen.add(key)
        try:
            if not np.isfinite(evaluate_layer(program, self.stats, 0)).all():
                return "nan_inf", None
            table = program_table(program, self.stats)
        except InvalidProgram:
            return "shape", None
        if not np.isfinite(table).all():
            return "nan_inf", None
        with np.errstate(all="ignore"):
            scores = score_configs(table, self.train.bit_index[self.screen_rows])
            spread, std = float(scores.max() - scores.min()), float(scores.std())
            if not (np.isfinite(spread) and np.isfinite(std)):
                return "nan_inf", None  # finite per layer, but too large to sum or square
            if spread <= 1e-9 * max(1.0, float(np.abs(scores).max())):
                return "constant", None
            signature = np.round((scores - scores.mean()) / std, 6).tobytes()
        if signature in self.signatures:
            return "equivalent", None
        self.signatures.add(signature)
        return None, table

    def score(self, program: Program) -> Candidate | None:
        reason, table = self.screen(program)
        if reason is not None or table is None:
            self.rejected[reason or "nan_inf"] += 1
            return None
        self.evaluated += 1
        with np.errstate(all="ignore"):
            scores = score_configs(table, self.train.bit_index)
        fitness = spearman(scores, self.train.accuracy) if np.isfinite(scores).all() else float("nan")
        if not np.isfinite(fitness):
            self.rejected["constant"] += 1
            return None
        return Candidate(program, fitness, table)

    def initial_population(self, seeds: Sequence[Program] = ()) -> list[Candidate]:
        population = [c for c in (self.score(p) for p in seeds) if c is not None]
        tries = 0
        while len(population) < self.population_size:
            if tries >= self.init_tries:
                raise RuntimeError(f"only {len(population)} valid programs in {tries} random draws")
            tries += 1
            candidate = self.score(random_program(self.rng, self.chain_length))
            if candidate is not None:
                population.append(candidate)
        return population

    def child(self, population: list[Candidate]) -> Program:
        ranked = sorted(population, key=lambda c: c.fitness, reverse=True)
        parents = ranked[: max(2, len(ranked) // 2)]
        first = self.rng.choice(parents).program
        program = first
        crossed = self.rng.random() < self.crossover_prob
        if crossed:
            program = crossover(first, self.rng.choice(parents).program, self.rng)
        if not crossed or self.rng.random() < self.mutation_prob or program.key() == first.key():
            program = mutate(program, self.rng)
        return program

    def run(self, generations: int, seeds: Sequence[Program] = (),
            progress: Callable[[int, float], None] | None = None) -> EvolutionResult:
        started = time.perf_counter()
        population = self.initial_population(seeds)
        best = max(population, key=lambda c: c.fitness)
        history = []
        for generation in range(generations):
            contenders = [c for c in (self.score(self.child(population)),
                                      self.score(random_program(self.rng, self.chain_length))) if c is not None]
            if contenders:
                population.append(max(contenders, key=lambda c: c.fitness))
                population.remove(min(population, key=lambda c: c.fitness))
                best = max([best, *contenders], key=lambda c: c.fitness)
            history.append(best.fitness)
            if progress is not None:
                progress(generation + 1, best.fitness)
        return EvolutionResult(best, sorted(population, key=lambda c: c.fitness, reverse=True), history,
                               dict(self.rejected), self.evaluated, time.perf_counter() - started, generations)
