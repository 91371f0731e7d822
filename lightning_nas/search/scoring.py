"""Batched candidate scoring: predicted accuracy, hardware costs, hard constraints, history.

:class:`Scorer` turns a batch of :class:`~lightning_nas.search.joint_space.Candidate` into

* ``accuracy``: one batched forward of the accuracy predictor (the full-precision
  :class:`~lightning_nas.predictors.accuracy.AccuracyPredictor` for a full-precision search, the
  quantization-aware one for a joint search) on the encodings of
  :func:`lightning_nas.data.pairs.encode_pairs`, the exact path the predictor was trained with;
* ``costs``: every metric of every cost model (``CostModel.evaluate(configs, policies)``);
* ``feasible``: whether every constraint (``metric -> maximum value``) holds.

Metric names are the cost models' own (``macs``, ``params``, ``bitops``, ``size_bytes``,
``latency_ms``, ``energy_mj``). When two models report the same metric (a measured CPU latency
table and the BitFusion accelerator both report ``latency_ms``), both are qualified with the
model's name: ``latency_table_latency_ms`` and ``bitfusion_latency_ms``.

Constraints are hard: strategies only return feasible candidates. The scorer remembers the
smallest value it has seen for every constrained metric, so a search that finds nothing feasible
can say how far off the constraint is (:class:`InfeasibleConstraintsError`).

:class:`SearchHistory` records every scored candidate (compactly, as choice-index vectors) for
the top-k, ``pareto.csv`` and the front.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..spaces.protocol import SearchSpace
from .joint_space import Candidate, JointSpace

__all__ = [
    "InfeasibleConstraintsError",
    "Scorer",
    "Scores",
    "SearchHistory",
    "pareto_mask",
    "probe_feasible",
]

#: What ``encode_pairs`` reads from a pair; scoring has no measured accuracy (``top1`` unused).
_Encodable = namedtuple("_Encodable", "arch policy top1")


class InfeasibleConstraintsError(ValueError):
    """No candidate satisfying every constraint was found within the capped number of tries.

    Attributes:
        constraints: metric -> maximum value.
        smallest: metric -> smallest value seen among all candidates whose costs were computed.
        tried: how many candidates were checked.
    """

    def __init__(self, constraints: Mapping[str, float], smallest: Mapping[str, float], tried: int,
                 joint_smallest: Mapping[str, float] | None = None) -> None:
        self.constraints = dict(constraints)
        self.smallest = dict(smallest)
        self.tried = tried
        parts = []
        for metric, limit in self.constraints.items():
            seen = self.smallest.get(metric, float("nan"))
            state = "never met" if not seen <= limit else "met alone"
            parts.append(f"{metric} <= {limit:g} (smallest found: {seen:g}, {state})")
        message = (f"no candidate satisfies the constraints after checking {tried} candidates: "
                   + "; ".join(parts) + ". Relax the constraints that are never met")
        if joint_smallest:
            message += (" (the smallest network at the lowest bit width has "
                        + ", ".join(f"{m} = {v:g}" for m, v in joint_smallest.items()) + ")")
        super().__init__(message)


@dataclass
class Scores:
    """Scores of a batch: ``accuracy`` (N,), ``costs`` {metric: (N,)}, ``feasible`` (N,) bool."""

    accuracy: np.ndarray
    costs: dict[str, np.ndarray]
    feasible: np.ndarray

    def __len__(self) -> int:
        return int(self.feasible.shape[0])

    def take(self, index: np.ndarray | Sequence[int]) -> Scores:
        index = np.asarray(index, dtype=np.int64)
        return Scores(self.accuracy[index], {k: v[index] for k, v in self.costs.items()}, self.feasible[index])

    @staticmethod
    def concat(parts: Sequence[Scores], metrics: Sequence[str]) -> Scores:
        if not parts:
            return Scores(np.zeros(0), {m: np.zeros(0) for m in metrics}, np.zeros(0, dtype=bool))
        return Scores(np.concatenate([p.accuracy for p in parts]),
                      {m: np.concatenate([p.costs[m] for p in parts]) for m in metrics},
                      np.concatenate([p.feasible for p in parts]))


def _model_name(model: Any) -> str:
    name = type(model).__name__
    return name[: -len("CostModel")].lower() if name.endswith("CostModel") else name.lower()


class Scorer:
    """Predictor + cost models + constraints for one joint space (see the module docstring).

    Args:
        joint: the joint space the candidates come from.
        predictor: an accuracy predictor (``torch.nn.Module``); quantization-aware iff ``joint``
            is quantized. Its input sizes must match the space's encodings.
        cost_models: ``{name: CostModel}`` (names qualify clashing metrics) or a list of models
            (named after their class: ``counts``, ``latencytable``, ``bitfusion``).
        constraints: ``{metric: maximum}``; every metric must be reported by a cost model.
        batch_size: candidates per predictor forward.
    """

    def __init__(
        self,
        joint: JointSpace,
        predictor: Any,
        cost_models: Mapping[str, Any] | Sequence[Any] = (),
        constraints: Mapping[str, float] | None = None,
        batch_size: int = 4096,
    ) -> None:
        from ..predictors.encoding import encode_pairs  # imports torch: kept out of module import

        self.joint = joint
        self.predictor = predictor.eval() if predictor is not None else None
        self.batch_size = int(batch_size)
        self._encode_pairs = encode_pairs
        if not isinstance(cost_models, Mapping):
            named: dict[str, Any] = {}
            for model in cost_models:
                base = _model_name(model)
                name, i = base, 2
                while name in named:
                    name, i = f"{base}_{i}", i + 1
                named[name] = model
            cost_models = named
        self.cost_models: dict[str, Any] = dict(cost_models)
        self._check_models()
        self._check_predictor()
        self._columns = self._metric_columns()
        self.metrics: list[str] = [column for _, _, column in self._columns]
        self.constraints: dict[str, float] = {}
        for metric, limit in (constraints or {}).items():
            if metric not in self.metrics:
                from ..errors import close_match

                hint = close_match(str(metric), self.metrics)
                raise RecipeError(
                    f"constraint on '{metric}', but no cost model reports it; the cost models report "
                    f"{self.metrics or 'nothing'} (counts: macs, params, bitops, size_bytes; latency_table: "
                    f"latency_ms; bitfusion: latency_ms, energy_mj)" + (f"; did you mean '{hint}'?" if hint else ""), key="search.constraints")
            self.constraints[metric] = float(limit)
        #: smallest value seen of every metric, over every candidate whose costs were computed
        self.smallest_seen: dict[str, float] = {m: float("inf") for m in self.metrics}
        self.cost_evaluations = 0
        self.predictions = 0

    # ------------------------------------------------------------------ checks

    def _check_models(self) -> None:
        """Cost models must describe the same space and bit widths as the search."""
        for name, model in self.cost_models.items():
            # a cost model may price without a space (a user's model); one that has a space must share ours
            space = getattr(model, "space", None)
            if isinstance(space, SearchSpace) and space != self.joint.space:
                raise RecipeError(f"cost model '{name}' was built for {space!r}, but the search space is "
                                 f"{self.joint.space!r}; give both the same space spec", key="search.cost_models")
            policy_space = getattr(model, "policy_space", None)
            if policy_space is not None and self.joint.policy_space is not None:
                theirs = (policy_space.bit_choices, policy_space.fixed_bits)
                ours = (self.joint.policy_space.bit_choices, self.joint.policy_space.fixed_bits)
                if theirs != ours:
                    raise RecipeError(f"cost model '{name}' prices bit widths {theirs[0]} (fixed {theirs[1]}), "
                                     f"but the search uses {ours[0]} (fixed {ours[1]}); set the same "
                                     "bit_choices and fixed_bits", key="search.cost_models")

    def _check_predictor(self) -> None:
        if self.predictor is None:
            return
        quant_predictor = hasattr(self.predictor, "policy_features")
        if self.joint.quantized and not quant_predictor:
            raise RecipeError("a quantization search needs the quantization-aware predictor (trained on quantized "
                             "pairs), but the predictor file holds a full-precision one", key="search.predictor")
        if not self.joint.quantized and quant_predictor:
            raise RecipeError("a full-precision search (no policy bits) needs a full-precision predictor, but the "
                             "predictor file holds a quantization-aware one", key="search.predictor")
        expected = self.joint.space.encoding_size
        if getattr(self.predictor, "arch_features", expected) != expected:
            raise RecipeError(f"the predictor reads {self.predictor.arch_features} architecture features but the "
                             f"search space encodes {expected}: it was trained for another space", key="search.predictor")
        if quant_predictor:
            assert self.joint.policy_space is not None
            expected = self.joint.policy_space.encoding_size(self.joint.num_blocks)
            if self.predictor.policy_features != expected:
                raise RecipeError(f"the predictor reads {self.predictor.policy_features} policy features but the "
                                 f"search's bit choices {self.joint.policy_space.bit_choices} encode {expected}", key="search.predictor")

    def _metric_columns(self) -> list[tuple[str, str, str]]:
        """(model name, model metric, column name) for every metric of every model."""
        counts: dict[str, int] = {}
        for model in self.cost_models.values():
            for metric in model.metrics:
                counts[metric] = counts.get(metric, 0) + 1
        return [(name, metric, metric if counts[metric] == 1 else f"{name}_{metric}")
                for name, model in self.cost_models.items() for metric in model.metrics]

    # ------------------------------------------------------------------ scoring

    def costs(self, candidates: Sequence[Candidate]) -> dict[str, np.ndarray]:
        """Every cost metric of every candidate (one batched call per cost model)."""
        configs = [c.config for c in candidates]
        policies = [c.policy for c in candidates] if self.joint.quantized else None
        out: dict[str, np.ndarray] = {}
        for name, model in self.cost_models.items():
            values = model.evaluate(configs, policies)
            for model_name, metric, column in self._columns:
                if model_name == name:
                    out[column] = np.asarray(values[metric], dtype=np.float64)
        if len(candidates):
            for metric, values in out.items():
                self.smallest_seen[metric] = min(self.smallest_seen[metric], float(values.min()))
        self.cost_evaluations += len(candidates)
        return out

    def feasible(self, costs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Boolean mask: every constraint holds."""
        n = len(next(iter(costs.values()))) if costs else 0
        mask = np.ones(n, dtype=bool)
        for metric, limit in self.constraints.items():
            mask &= costs[metric] <= limit
        return mask

    def accuracy(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Predicted accuracy of every candidate: one predictor forward per ``batch_size``."""
        import torch

        if self.predictor is None:
            raise ValueError("this scorer has no predictor")
        out = np.zeros(len(candidates), dtype=np.float64)
        space, policy_space = self.joint.space, self.joint.policy_space
        for start in range(0, len(candidates), self.batch_size):
            chunk = candidates[start : start + self.batch_size]
            rows = [_Encodable(c.config, c.policy, 0.0) for c in chunk]
            archs, policies, _ = self._encode_pairs(space, policy_space, rows)
            with torch.no_grad():
                out[start : start + len(chunk)] = self.predictor(archs, policies).double().numpy()
        self.predictions += len(candidates)
        return out

    def score(self, candidates: Sequence[Candidate]) -> Scores:
        """Accuracy, costs and feasibility of a batch."""
        costs = self.costs(candidates)
        return Scores(self.accuracy(candidates), costs, self.feasible(costs))

    # ------------------------------------------------------------------ reporting

    def constrained_smallest(self) -> dict[str, float]:
        return {m: self.smallest_seen[m] for m in self.constraints}

    def infeasible_error(self, tried: int | None = None) -> InfeasibleConstraintsError:
        """The error to raise when no feasible candidate was found (with the smallest values seen
        and the costs of the smallest candidate of the space, computed here if needed)."""
        tried = self.cost_evaluations if tried is None else tried
        smallest_costs = self.costs([self.joint.smallest()])
        reference = {m: float(smallest_costs[m][0]) for m in self.constraints}
        return InfeasibleConstraintsError(self.constraints, self.constrained_smallest(), tried, reference)

    def penalty(self, costs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Total relative constraint violation, ``sum(max(0, value / limit - 1))`` (0 when feasible)."""
        n = len(next(iter(costs.values()))) if costs else 0
        out = np.zeros(n)
        for metric, limit in self.constraints.items():
            scale = abs(limit) if limit != 0 else 1.0
            out += np.maximum(0.0, (costs[metric] - limit) / scale)
        return out


def probe_feasible(joint: JointSpace, scorer: Scorer, seed: int = 0, samples: int = 2000) -> Candidate:
    """A feasible candidate among the space's smallest one and ``samples`` random ones (costs
    only, one batch), or :class:`InfeasibleConstraintsError` when there is none: a cheap, bounded
    check that the constraints can be met before a strategy spends its budget."""
    import random

    if not scorer.constraints:
        return joint.smallest()
    rng = random.Random(seed)
    batch = [joint.smallest()] + [joint.sample(rng) for _ in range(samples)]
    ok = np.flatnonzero(scorer.feasible(scorer.costs(batch)))
    if not ok.size:
        raise scorer.infeasible_error()
    return batch[int(ok[0])]


# ---------------------------------------------------------------------------------------------


ORIGINS = ("random", "mutation", "crossover", "smallest", "nni")


class SearchHistory:
    """Every scored candidate of a search, in order, stored as choice-index vectors.

    Columns: ``vectors`` (N, L) uint8, ``accuracy``, ``costs`` per metric, ``feasible``,
    ``generation`` (-1 when not generational), ``origin`` (one of :data:`ORIGINS`).
    """

    def __init__(self, joint: JointSpace, metrics: Sequence[str]) -> None:
        self.joint = joint
        self.metrics = list(metrics)
        self._vectors: list[np.ndarray] = []
        self._scores: list[Scores] = []
        self._generation: list[np.ndarray] = []
        self._origin: list[np.ndarray] = []
        self._cache: tuple | None = None

    def add(self, candidates: Sequence[Candidate], scores: Scores, origin: str | Sequence[str],
            generation: int | Sequence[int] = -1, vectors: Sequence[Sequence[int]] | None = None) -> None:
        """Append a scored batch; ``generation`` one for the batch or one per candidate;
        ``vectors`` (the candidates' :meth:`JointSpace.to_vector`) when the caller already has them."""
        if len(candidates) != len(scores):
            raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
        if not len(candidates):
            return
        origins = [origin] * len(candidates) if isinstance(origin, str) else list(origin)
        if vectors is None:
            vectors = [self.joint.to_vector(c) for c in candidates]
        self._vectors.append(np.asarray(vectors, dtype=np.uint8))
        self._scores.append(scores)
        if isinstance(generation, (int, np.integer)):
            self._generation.append(np.full(len(candidates), generation, dtype=np.int32))
        else:
            generations = np.asarray(generation, dtype=np.int32)
            if generations.shape != (len(candidates),):
                raise ValueError(f"{len(candidates)} candidates but {generations.size} generations")
            self._generation.append(generations)
        self._origin.append(np.asarray([ORIGINS.index(o) for o in origins], dtype=np.int8))
        self._cache = None

    def __len__(self) -> int:
        return sum(len(s) for s in self._scores)

    def _arrays(self) -> tuple[np.ndarray, Scores, np.ndarray, np.ndarray]:
        if self._cache is None:
            width = len(self.joint.labels)
            vectors = np.concatenate(self._vectors) if self._vectors else np.zeros((0, width), dtype=np.uint8)
            scores = Scores.concat(self._scores, self.metrics)
            generation = np.concatenate(self._generation) if self._generation else np.zeros(0, dtype=np.int32)
            origin = np.concatenate(self._origin) if self._origin else np.zeros(0, dtype=np.int8)
            self._cache = (vectors, scores, generation, origin)
            # keep one chunk so later appends concatenate once
            self._vectors, self._scores, self._generation, self._origin = [vectors], [scores], [generation], [origin]
        return self._cache

    @property
    def vectors(self) -> np.ndarray:
        return self._arrays()[0]

    @property
    def scores(self) -> Scores:
        return self._arrays()[1]

    @property
    def generation(self) -> np.ndarray:
        return self._arrays()[2]

    @property
    def origin(self) -> list[str]:
        return [ORIGINS[i] for i in self._arrays()[3]]

    def candidate(self, index: int) -> Candidate:
        return self.joint.decode_vector(self.vectors[index].tolist())

    def unique_feasible(self) -> np.ndarray:
        """Indices of the first occurrence of every distinct feasible candidate."""
        vectors, scores, _, _ = self._arrays()
        feasible = np.flatnonzero(scores.feasible)
        if not feasible.size:
            return feasible
        _, first = np.unique(vectors[feasible], axis=0, return_index=True)
        return np.sort(feasible[first])

    def top_k(self, k: int) -> list[int]:
        """Indices of the ``k`` best distinct feasible candidates by predicted accuracy (ties: the
        earlier one first)."""
        index = self.unique_feasible()
        accuracy = self.scores.accuracy[index]
        order = np.lexsort((index, -accuracy))
        return index[order][:k].tolist()


def pareto_mask(accuracy: np.ndarray, cost: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Candidates on the (maximise accuracy, minimise cost) front among ``mask`` (default: all).

    A candidate is on the front when no other candidate has lower-or-equal cost and higher
    accuracy, or lower cost and equal accuracy; of identical (cost, accuracy) points the first
    is kept.
    """
    accuracy, cost = np.asarray(accuracy, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    on = np.zeros(len(accuracy), dtype=bool)
    candidates = np.flatnonzero(np.ones(len(accuracy), dtype=bool) if mask is None else mask)
    if not candidates.size:
        return on
    # cost ascending, then accuracy descending, then index: a point is on the front iff it beats
    # the best accuracy of everything before it
    order = candidates[np.lexsort((candidates, -accuracy[candidates], cost[candidates]))]
    best = -np.inf
    for i in order:
        if accuracy[i] > best:
            on[i] = True
            best = accuracy[i]
    return on
