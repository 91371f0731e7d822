"""APQ / once-for-all evolution over the joint space, scored a whole generation at a time.

The search stage runs this algorithm as an NNI strategy
(:class:`~lightning_nas.search.nni_evolution.APQEvolutionStrategy`, strategy ``apq_evolution``),
which reuses this class's settings, operators, rejection and selection; :meth:`APQEvolution.run`
is the same search as a direct loop without NNI, kept as the reference the NNI strategy is tested
against (equal results for the same seed) and measured beside (``benchmarks/search_speed.py``).

One generation, as in the once-for-all ``EvolutionFinder`` that APQ reuses:

1. the ``parents`` best distinct candidates of the previous pool are kept (elitism);
2. ``mutations`` children mutate a random parent (per-gene probability ``mutation_prob``,
   resolution ``resolution_prob``) and ``population_size - mutations`` children cross two random
   parents over (uniform crossover);
3. the children are scored in one batch and **every child joins the pool** (parents + children)
   that the next selection reads. APQ's reference code builds its crossover children but drops
   them before selection; here they compete like the mutants (``stats["selected"]`` counts, per
   generation, how many selected parents came from each operator).

Constraints are hard and handled by rejection: every child (and every member of the initial
random population) is cost-checked before it is scored, and an infeasible one is drawn again, at
most ``max_tries`` times per slot. A slot that never yields a feasible child is left empty for
that generation. When not a single feasible candidate turns up for the initial population, the
smallest candidate of the space is tried; if it violates a constraint too, the search stops with
:class:`~lightning_nas.search.scoring.InfeasibleConstraintsError`, which gives the smallest value
found for every constraint. The search never loops without bound.

The budget ``evaluations`` counts scored candidates (the initial population and every child);
rejected draws are counted separately (``stats["rejected"]``). The run is reproducible: all
randomness comes from one ``random.Random(seed)`` and the predictor runs deterministically.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .joint_space import Candidate, JointSpace
from .scoring import Scorer, Scores, SearchHistory

__all__ = ["APQEvolution"]


class _Member(NamedTuple):
    """A scored candidate in the selection pool."""

    candidate: Candidate
    accuracy: float
    origin: str
    key: bytes


class APQEvolution:
    """Elitist evolution with mutation and crossover (see the module docstring).

    Args:
        joint: the joint architecture / policy space.
        scorer: predictor, cost models and constraints.
        population_size: children per generation (mutants + crossovers), and the size of the
            initial random population.
        parents: candidates kept by each selection.
        mutations: mutants per generation; the other ``population_size - mutations`` children
            come from crossover.
        mutation_prob: per-gene mutation probability (kernel, ratio, depth, every policy entry).
        resolution_prob: probability of resampling the resolution.
        policy_prob: per-entry mutation probability of the policy (default ``mutation_prob``).
        evaluations: scored candidates in total (about ``population_size`` per generation).
        max_tries: draws per population slot or child before it is given up.
        seed: seeds the one random generator of the search.
        progress: called with the number of newly scored candidates after each batch.
    """

    def __init__(
        self,
        joint: JointSpace,
        scorer: Scorer,
        *,
        population_size: int = 100,
        parents: int = 25,
        mutations: int = 50,
        mutation_prob: float = 0.1,
        resolution_prob: float = 0.5,
        policy_prob: float | None = None,
        evaluations: int = 50_000,
        max_tries: int = 100,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if population_size < 1:
            raise ValueError(f"population_size must be at least 1, got {population_size}")
        if not 1 <= parents <= population_size:
            raise ValueError(f"parents must be in [1, population_size={population_size}], got {parents}")
        if not 0 <= mutations <= population_size:
            raise ValueError(f"mutations must be in [0, population_size={population_size}], got {mutations}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        if evaluations < 1:
            raise ValueError(f"evaluations must be at least 1, got {evaluations}")
        for name, p in (("mutation_prob", mutation_prob), ("resolution_prob", resolution_prob),
                        ("policy_prob", policy_prob)):
            if p is not None and not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.joint, self.scorer = joint, scorer
        self.population_size, self.parents, self.mutations = population_size, parents, mutations
        self.crossovers = population_size - mutations
        self.mutation_prob, self.resolution_prob, self.policy_prob = mutation_prob, resolution_prob, policy_prob
        self.evaluations, self.max_tries, self.seed = evaluations, max_tries, seed
        self.progress = progress
        self.history = SearchHistory(joint, scorer.metrics)
        self.stats: dict[str, Any] = {"generations": 0, "rejected": 0, "empty_slots": 0, "selected": []}
        #: the parents chosen by the last selection
        self.population: list[_Member] = []

    # ------------------------------------------------------------------ helpers

    def _feasible_draws(self, slots: list[str], draw: Callable[[str], Candidate]
                        ) -> tuple[list[Candidate], list[str], dict[str, np.ndarray]]:
        """Fill ``slots`` (one operator name each) with feasible candidates from ``draw``, at
        most ``max_tries`` draws per slot, all slots of a round cost-checked in one batch."""
        filled: list[tuple[Candidate, dict[str, float]] | None] = [None] * len(slots)
        for _ in range(self.max_tries):
            pending = [i for i, f in enumerate(filled) if f is None]
            if not pending:
                break
            batch = [draw(slots[i]) for i in pending]
            costs = self.scorer.costs(batch)
            ok = self.scorer.feasible(costs)
            self.stats["rejected"] += int((~ok).sum())
            for j in np.flatnonzero(ok):
                filled[pending[j]] = (batch[j], {m: costs[m][j] for m in costs})
        kept = [i for i, f in enumerate(filled) if f is not None]
        self.stats["empty_slots"] += len(slots) - len(kept)
        candidates = [filled[i][0] for i in kept]  # type: ignore[index]
        origins = [slots[i] for i in kept]
        costs = {m: np.asarray([filled[i][1][m] for i in kept], dtype=np.float64)  # type: ignore[index]
                 for m in self.scorer.metrics}
        return candidates, origins, costs

    def _score(self, candidates: list[Candidate], costs: dict[str, np.ndarray]) -> Scores:
        accuracy = self.scorer.accuracy(candidates) if candidates else np.zeros(0)
        return Scores(accuracy, costs, np.ones(len(candidates), dtype=bool))

    def _record(self, candidates: list[Candidate], scores: Scores, origins: list[str], generation: int
                ) -> list[_Member]:
        """Add a scored batch to the history; returns it as pool members."""
        vectors = [self.joint.to_vector(c) for c in candidates]
        self.history.add(candidates, scores, origins, generation, vectors=vectors)
        if self.progress is not None and candidates:
            self.progress(len(candidates))
        return [_Member(c, float(a), o, bytes(v)) for c, a, o, v in zip(candidates, scores.accuracy, origins, vectors)]

    def _select(self, pool: list[_Member]) -> list[_Member]:
        """The ``parents`` best distinct candidates (stable: earlier entries win ties)."""
        order = sorted(range(len(pool)), key=lambda i: -pool[i].accuracy)
        seen: set[bytes] = set()
        chosen = []
        for i in order:
            if pool[i].key in seen:
                continue
            seen.add(pool[i].key)
            chosen.append(pool[i])
            if len(chosen) == self.parents:
                break
        return chosen

    def _child_maker(self, members: list[Candidate], rng: random.Random) -> Callable[[str], Candidate]:
        """Draws a child of ``members``: a mutant of one random parent or a crossover of two."""

        def draw(kind: str) -> Candidate:
            if kind == "mutation":
                return self.joint.mutate(rng.choice(members), rng, prob=self.mutation_prob,
                                         resolution_prob=self.resolution_prob, policy_prob=self.policy_prob)
            return self.joint.crossover(rng.choice(members), rng.choice(members), rng)

        return draw

    # ------------------------------------------------------------------ search

    def run(self) -> SearchHistory:
        """Run until ``evaluations`` candidates are scored; returns the history."""
        rng = random.Random(self.seed)
        started = time.perf_counter()
        size = min(self.population_size, self.evaluations)
        candidates, origins, costs = self._feasible_draws(["random"] * size, lambda _: self.joint.sample(rng))
        if not candidates:
            smallest = self.joint.smallest()
            smallest_costs = self.scorer.costs([smallest])
            if not self.scorer.feasible(smallest_costs)[0]:
                raise self.scorer.infeasible_error()
            candidates, origins, costs = [smallest], ["smallest"], smallest_costs
        pool = self._record(candidates, self._score(candidates, costs), origins, 0)

        generation = 0
        while len(self.history) < self.evaluations:
            generation += 1
            parents = self._select(pool)
            self.population = parents
            self.stats["selected"].append(dict(Counter(p.origin for p in parents)))
            remaining = self.evaluations - len(self.history)
            n_children = min(self.population_size, remaining)
            n_mut = int(round(n_children * self.mutations / self.population_size))
            slots = ["mutation"] * n_mut + ["crossover"] * (n_children - n_mut)
            draw = self._child_maker([p.candidate for p in parents], rng)
            children, origins, costs = self._feasible_draws(slots, draw)
            if not children:
                # every slot exhausted its tries: the feasible region around the parents is too
                # thin for rejection sampling; stop instead of spinning
                generation -= 1
                break
            # every child joins the pool, crossover children included
            pool = parents + self._record(children, self._score(children, costs), origins, generation)
        self.population = self._select(pool)
        self.stats["generations"] = generation
        self.stats["evaluations"] = len(self.history)
        self.stats["seconds"] = time.perf_counter() - started
        return self.history
