"""Every strategy through NNI 3.0 over the joint space, in-process, with the experiment inside the
run dir: the batched engine against NNI's sequential one, hard constraints, the infeasible error."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_nas.errors import RecipeError
from lightning_nas.predictors.accuracy import QuantAccuracyPredictor
from lightning_nas.search.joint_space import JointSpace
from lightning_nas.search.nni_strategies import STRATEGIES, NNISearch, make_strategy
from lightning_nas.search.scoring import InfeasibleConstraintsError, Scorer

#: about a third of random candidates meet both
CONSTRAINTS = {"latency_ms": 0.5, "bitops": 8.0e8}
TRIALS = 30
OPTIONS = {"regularized_evolution": {"population_size": 10, "sample_size": 3},
           "apq_evolution": {"population_size": 10, "parents": 3, "mutations": 5}}
#: every strategy that runs without optional packages
RUNNABLE = ["apq_evolution", "random", "regularized_evolution", "tpe", "grid"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_scorer(joint: JointSpace, models: dict, constraints: dict) -> Scorer:
    torch.manual_seed(0)
    predictor = QuantAccuracyPredictor(joint.space.encoding_size, joint.policy_space.encoding_size(joint.num_blocks),
                                       hidden=16, layers=1, base_accuracy=70.0)
    return Scorer(joint, predictor, models, constraints)


def search(joint, models, strategy: str, directory: Path, seed: int = 0, constraints=CONSTRAINTS,
           trials: int = TRIALS, **kwargs) -> NNISearch:
    return NNISearch(joint, make_scorer(joint, models, constraints), strategy, trials, directory, seed=seed,
                     options=OPTIONS.get(strategy), **kwargs)


@pytest.mark.parametrize("strategy", RUNNABLE)
def test_strategy_runs_a_small_constrained_search(joint, models, strategy: str, tmp_path: Path) -> None:
    experiments = tmp_path / "run" / "search" / "nni"
    runner = search(joint, models, strategy, experiments, concurrency=8)
    started = time.perf_counter()
    history = runner.run()
    # TPE runs without NNI's one-second sleep per trial
    assert time.perf_counter() - started < 20
    assert len(history) == TRIALS
    if strategy == "apq_evolution":
        assert set(history.origin) <= {"random", "mutation", "crossover"} and history.scores.feasible.all()
    else:
        assert set(history.origin) == {"nni"} and (history.generation == -1).all()
        assert 0 < history.scores.feasible.sum() <= TRIALS
    top = [history.candidate(i) for i in history.top_k(5)]
    configs, policies = [c.config for c in top], [c.policy for c in top]
    direct = {**models["counts"].evaluate(configs, policies), **models["bitfusion"].evaluate(configs, policies)}
    for metric, limit in CONSTRAINTS.items():
        assert (direct[metric] <= limit).all(), metric
    # NNI's experiment (checkpoint, log, manifest) lives in the run directory, not in ~/nni-experiments
    assert (experiments / ".experiment").is_file()
    assert (experiments / runner.experiment_id / "checkpoint" / "config.json").is_file()
    assert (experiments / runner.experiment_id / "log" / "experiment.log").is_file()
    assert not (Path.home() / "nni-experiments" / runner.experiment_id).exists()
    # every reported metric orders feasible candidates above infeasible ones
    assert history.scores.feasible[history.top_k(1)[0]]


#: the batched engine runs exactly NNI's sequential search when the strategy does not read results
#: (random, grid) or waits for them (apq_evolution), at any concurrency; strategies that read
#: results as they come (regularized evolution, TPE) only with one model in flight
ORDER_FREE = [("random", 7), ("grid", 7), ("apq_evolution", 4), ("regularized_evolution", 1), ("tpe", 1)]


@pytest.mark.parametrize(("strategy", "concurrency"), ORDER_FREE)
def test_batched_engine_equals_the_sequential_engine(joint, models, strategy, concurrency, tmp_path: Path) -> None:
    sequential = search(joint, models, strategy, tmp_path / "s", seed=2, engine="sequential").run()
    batched = search(joint, models, strategy, tmp_path / "b", seed=2, concurrency=concurrency).run()
    np.testing.assert_array_equal(batched.vectors, sequential.vectors)
    # the predictor sees batches of another size: float32 sums in another order
    np.testing.assert_allclose(batched.scores.accuracy, sequential.scores.accuracy, atol=1e-4)
    np.testing.assert_array_equal(batched.scores.feasible, sequential.scores.feasible)


@pytest.mark.parametrize("strategy", ["regularized_evolution", "tpe"])
def test_strategies_reading_results_differ_with_models_in_flight(joint, models, strategy, tmp_path: Path) -> None:
    """The documented difference: with K models in flight a child is bred from (regularized
    evolution) or suggested by (TPE, whose constant liar stands in for the K - 1 unscored ones)
    results K - 1 models older than the sequential engine's."""
    sequential = search(joint, models, strategy, tmp_path / "s", seed=2, engine="sequential", trials=60).run()
    batched = search(joint, models, strategy, tmp_path / "b", seed=2, concurrency=10, trials=60).run()
    # the start (random population / TPE's 20 start-up draws) does not read results
    start = 10 if strategy == "regularized_evolution" else 20
    np.testing.assert_array_equal(batched.vectors[:start], sequential.vectors[:start])
    assert not np.array_equal(batched.vectors[start:], sequential.vectors[start:])

@pytest.mark.parametrize("strategy", ["random", "regularized_evolution", "tpe", "apq_evolution"])
def test_strategies_are_reproducible_with_a_seed(joint, models, strategy: str, tmp_path: Path) -> None:
    first = search(joint, models, strategy, tmp_path / "a", seed=5).run()
    second = search(joint, models, strategy, tmp_path / "b", seed=5).run()
    np.testing.assert_array_equal(first.vectors, second.vectors)
    np.testing.assert_array_equal(first.scores.accuracy, second.scores.accuracy)


@pytest.mark.parametrize("strategy", RUNNABLE)
def test_infeasible_constraint_fails_before_the_budget_is_spent(joint, models, strategy, tmp_path: Path) -> None:
    runner = search(joint, models, strategy, tmp_path / "nni", constraints={"bitops": 1.0e6}, trials=50_000)
    started = time.perf_counter()
    with pytest.raises(InfeasibleConstraintsError, match=r"bitops <= 1e\+06 \(smallest found: 2\.\d+e\+08, never met\)"):
        runner.run()
    assert time.perf_counter() - started < 15
    assert len(runner.history) == 0  # nothing was scored
    # NNI's own strategies are stopped by the probe before the experiment starts; the APQ
    # evolution by its capped initial draws and the smallest candidate
    assert (runner.experiment_id is None) == (strategy != "apq_evolution")


@pytest.mark.skipif(importlib.util.find_spec("tianshou") is not None, reason="tianshou is installed")
def test_policy_rl_without_tianshou_says_so() -> None:
    with pytest.raises(RecipeError, match="needs the tianshou package"):
        make_strategy("policy_rl")


def test_unknown_strategy_and_bad_options_are_refused(joint, models, tmp_path: Path) -> None:
    assert "policy_rl" in STRATEGIES and "apq_evolution" in STRATEGIES
    with pytest.raises(ValueError, match="unknown engine 'remote'"):
        NNISearch(joint, make_scorer(joint, models, {}), "random", 10, tmp_path, engine="remote")
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        NNISearch(joint, make_scorer(joint, models, {}), "random", 10, tmp_path, concurrency=0)
    # regularized evolution needs a scored population before it mutates
    runner = NNISearch(joint, make_scorer(joint, models, {}), "regularized_evolution", 10, tmp_path,
                       options={"population_size": 8, "sample_size": 2}, concurrency=50)
    assert runner.concurrency == 8
    with pytest.raises(ValueError, match="unknown NNI strategy 'bayes'"):
        NNISearch(joint, make_scorer(joint, models, {}), "bayes", 10, tmp_path)
    with pytest.raises(RecipeError, match=r"invalid options \{'gamma': 0.5\} for NNI strategy 'tpe'"):
        NNISearch(joint, make_scorer(joint, models, {}), "tpe", 10, tmp_path, options={"gamma": 0.5})
