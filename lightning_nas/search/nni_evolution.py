"""APQ's evolution as an NNI 3.0 ``Strategy``.

The algorithm is :class:`~lightning_nas.search.evolution.APQEvolution`'s, step for step and draw
for draw (the same ``random.Random(seed)``, the same operators, the same rejection rounds); what
changes is who scores the children. Each generation's feasible children are frozen into models
of the :class:`~lightning_nas.search.nni_engine.JointModelSpace`, submitted to the execution
engine, waited for, and read back from ``model.metric``, as any NNI strategy does. With the
:class:`~lightning_nas.search.nni_engine.BatchedExecutionEngine` a generation is one batch (one
predictor forward); with NNI's sequential engine each child is one trial. The search is
generational (it waits for the whole generation before selecting), so its result does not
depend on the engine or on the engine's concurrency.

The costs computed while rejecting infeasible draws travel with the models (``model.costs``), so
the engine does not compute them again; the reported metric of a child is its predicted accuracy.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np

from .evolution import APQEvolution, _Member
from .joint_space import Candidate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nni.nas.strategy import Strategy

__all__ = ["APQEvolutionStrategy"]


class APQEvolutionStrategy(Strategy):
    """APQ / once-for-all evolution (elitism, mutants and crossover children that compete,
    rejection of infeasible draws with a cap) on NNI's ``Strategy`` interface.

    Args:
        evolution: the algorithm's settings, operators and statistics: an
            :class:`~lightning_nas.search.evolution.APQEvolution` (its ``run`` is not called;
            its ``stats`` and ``population`` are filled as by ``run``).

    The model space must be a :class:`~lightning_nas.search.nni_engine.JointModelSpace` of the
    same joint space. Raises the scorer's
    :class:`~lightning_nas.search.scoring.InfeasibleConstraintsError` when neither the initial
    draws nor the smallest candidate meet the constraints.
    """

    def __init__(self, evolution: APQEvolution) -> None:
        super().__init__()
        self.evolution = evolution
        self.submitted = 0

    def extra_repr(self) -> str:
        e = self.evolution
        return (f"population_size={e.population_size}, parents={e.parents}, mutations={e.mutations}, "
                f"mutation_prob={e.mutation_prob}, evaluations={e.evaluations}, seed={e.seed}")

    def _evaluate(self, candidates: list[Candidate], origins: list[str], costs: dict[str, np.ndarray],
                  generation: int) -> list[_Member]:
        """Submit a generation, wait for it, and read every child's metric back."""
        joint = self.evolution.joint
        metrics = list(costs)
        vectors = [joint.to_vector(c) for c in candidates]
        models = [self.model_space.freeze_candidate(c, v, o, generation, {m: float(costs[m][i]) for m in metrics})
                  for i, (c, v, o) in enumerate(zip(candidates, vectors, origins))]
        self.engine.submit_models(*models)
        self.submitted += len(models)
        self.engine.wait_models(*models)
        members = []
        for model, candidate, origin, vector in zip(models, candidates, origins, vectors):
            if model.metric is None:
                raise RuntimeError(f"the engine finished {model} without a metric")
            members.append(_Member(candidate, float(model.metric), origin, bytes(vector)))
        return members

    def _run(self) -> None:
        evo = self.evolution
        joint, scorer = evo.joint, evo.scorer
        rng = random.Random(evo.seed)
        started = time.perf_counter()
        size = min(evo.population_size, evo.evaluations)
        candidates, origins, costs = evo._feasible_draws(["random"] * size, lambda _: joint.sample(rng))
        if not candidates:
            smallest = joint.smallest()
            smallest_costs = scorer.costs([smallest])
            if not scorer.feasible(smallest_costs)[0]:
                raise scorer.infeasible_error()
            candidates, origins, costs = [smallest], ["smallest"], smallest_costs
        pool = self._evaluate(candidates, origins, costs, 0)

        generation = 0
        while self.submitted < evo.evaluations and self.engine.budget_available():
            generation += 1
            parents = evo._select(pool)
            evo.population = parents
            evo.stats["selected"].append(dict(Counter(p.origin for p in parents)))
            remaining = evo.evaluations - self.submitted
            n_children = min(evo.population_size, remaining)
            n_mut = int(round(n_children * evo.mutations / evo.population_size))
            slots = ["mutation"] * n_mut + ["crossover"] * (n_children - n_mut)
            draw = evo._child_maker([p.candidate for p in parents], rng)
            children, origins, costs = evo._feasible_draws(slots, draw)
            if not children:
                # every slot exhausted its tries (see APQEvolution.run)
                generation -= 1
                break
            pool = parents + self._evaluate(children, origins, costs, generation)
        evo.population = evo._select(pool)
        evo.stats["generations"] = generation
        evo.stats["evaluations"] = self.submitted
        evo.stats["seconds"] = time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "generations": self.evolution.stats["generations"]}

    def load_state_dict(self, state_dict: dict) -> None:
        # the population lives in memory only: a resumed search starts over
        self.submitted = 0
