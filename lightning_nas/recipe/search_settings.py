"""Recipe settings of ``lightning-nas search`` (read by recipe validation: no torch, no NNI here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..targets import TargetName
from .markers import (
    BitChoices,
    CostModelSpec,
    ExistingFile,
    FixedBits,
    Fraction,
    NonNegativeInt,
    PositiveInt,
    SpaceSpec,
)

__all__ = ["SEARCH_STRATEGIES", "SearchSettings"]

#: All NNI strategies: ``apq_evolution`` is APQ's evolution on NNI's Strategy interface, the others NNI 3.0's own.
SEARCH_STRATEGIES = ("apq_evolution", "regularized_evolution", "random", "tpe", "grid", "policy_rl")


@dataclass
class SearchSettings:
    """``lightning-nas search``: joint architecture / channel-pruning / quantization search.

    Candidates (an OFA config and, unless ``policy_bits`` is null, a per-block APQ quantization
    policy) are scored by the accuracy predictor and the cost models; every constraint is a hard
    limit. Writes ``<run_dir>/search/topk.json``, ``pareto.csv`` and ``pareto.png``.
    """

    #: The architecture space (``{name: ofa_mbv3_cifar, ...}``); the predictor and every cost model
    #: must have been built for the same one.
    space: SpaceSpec
    #: ``predictor.pt`` written by a predictor recipe: quantization-aware (``data.kind: quant``) for a
    #: joint search, full-precision for ``policy_bits: null``.
    predictor: ExistingFile
    #: Cost models (``{name: counts | latency_table | bitfusion, space: ..., ...}``). A metric two
    #: models report is qualified with the model's name (``bitfusion_latency_ms``).
    cost_models: list[CostModelSpec] = field(default_factory=list)
    #: Hard limits, metric -> maximum: ``macs``, ``params``, ``bitops``, ``size_bytes``, ``latency_ms``,
    #: ``energy_mj`` (or their qualified names).
    constraints: dict[str, float] = field(default_factory=dict)
    #: Bit widths of the quantization policy (APQ: 4, 6, 8); null searches full precision only.
    policy_bits: BitChoices | None = field(default_factory=lambda: [4, 6, 8])
    #: Bits of the layers outside the policy (stem, first block, head, classifier, squeeze-excite).
    fixed_bits: FixedBits = 8
    strategy: Literal["apq_evolution", "regularized_evolution", "random", "tpe", "grid", "policy_rl"] = "apq_evolution"
    #: Extra keyword arguments of the strategy: of NNI's strategy class (e.g. ``{sample_size: 10,
    #: crossover: true}`` for ``regularized_evolution``), or of ``APQEvolution`` for ``apq_evolution``.
    strategy_options: dict[str, Any] = field(default_factory=dict)
    #: Candidates scored in total (APQ: 500 generations x 100 = 50,000).
    evaluations: PositiveInt = 50000
    #: Children per generation and initial population (``apq_evolution``, ``regularized_evolution``).
    population: PositiveInt = 100
    #: Parents kept by each selection (``regularized_evolution``: the tournament size).
    parents: PositiveInt = 25
    #: Mutants per generation; the rest of ``population`` comes from crossover (``apq_evolution``).
    mutations: NonNegativeInt = 50
    #: Per-gene mutation probability (kernel, expand ratio, depth, policy entries).
    mutation_prob: Fraction = 0.1
    resolution_prob: Fraction = 0.5
    #: Per-entry mutation probability of the policy; default ``mutation_prob``.
    policy_mutation_prob: Fraction | None = None
    #: Rejection sampling: draws per child before its slot is given up (``apq_evolution``).
    max_tries: PositiveInt = 100
    top_k: PositiveInt = 10
    #: Cost axis of the Pareto front; default: the first constrained metric, else the first metric.
    pareto_metric: str | None = None
    #: Candidates per predictor forward.
    batch_size: PositiveInt = 4096
    #: Models the strategy keeps in flight; the engine scores them as one batch (``apq_evolution``
    #: waits for each generation, so its result does not depend on it; ``regularized_evolution``
    #: uses at most ``population``; ``random`` and ``grid`` do not read results; ``tpe`` gives the
    #: models in flight its constant-liar value). 1 reproduces NNI's one-trial-at-a-time order.
    concurrency: PositiveInt = 100
    progress: bool = True
    #: Default: the recipe's ``seed``.
    seed: int | None = None
    #: The deployment target searched for; the predictor's quantized pairs and every latency table
    #: must have been measured for it (``auto``: this host, torch runtime).
    target: TargetName = "auto"
    #: Combine a predictor or tables of other targets anyway.
    allow_mixed_targets: bool = False
