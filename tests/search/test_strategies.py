"""NNI 3.0 strategies over the joint space, in-process, with the experiment inside the run dir."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel
from lightning_nas.predictors.accuracy import QuantAccuracyPredictor
from lightning_nas.recipe.errors import RecipeError
from lightning_nas.search.joint_space import JointSpace
from lightning_nas.search.nni_strategies import STRATEGIES, NNISearch, make_strategy
from lightning_nas.search.scoring import InfeasibleConstraintsError, Scorer
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3CifarSpace
from lightning_nas.spaces.quant_policy import QuantPolicySpace

#: about a third of random candidates meet both
CONSTRAINTS = {"latency_ms": 0.5, "bitops": 8.0e8}
TRIALS = 30
OPTIONS = {"regularized_evolution": {"population_size": 10, "sample_size": 3}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one intra-op thread is faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def joint() -> JointSpace:
    return JointSpace(OFAMobileNetV3CifarSpace(), QuantPolicySpace())


@pytest.fixture(scope="module")
def models(joint: JointSpace) -> dict:
    return {"counts": CountsCostModel(joint.space), "bitfusion": BitFusionCostModel(joint.space)}


def make_scorer(joint: JointSpace, models: dict, constraints: dict) -> Scorer:
    torch.manual_seed(0)
    predictor = QuantAccuracyPredictor(joint.space.encoding_size, joint.policy_space.encoding_size(joint.num_blocks),
                                       hidden=16, layers=1, base_accuracy=70.0)
    return Scorer(joint, predictor, models, constraints)


def search(joint, models, strategy: str, directory: Path, seed: int = 0, constraints=CONSTRAINTS) -> NNISearch:
    return NNISearch(joint, make_scorer(joint, models, constraints), strategy, TRIALS, directory, seed=seed,
                     options=OPTIONS.get(strategy))


@pytest.mark.parametrize("strategy", ["random", "regularized_evolution", "tpe", "grid"])
def test_strategy_runs_a_small_constrained_search(joint, models, strategy: str, tmp_path: Path) -> None:
    experiments = tmp_path / "run" / "search" / "nni"
    runner = search(joint, models, strategy, experiments)
    started = time.perf_counter()
    history = runner.run()
    # TPE runs without NNI's one-second sleep per trial
    assert time.perf_counter() - started < 20
    assert len(history) == TRIALS and set(history.origin) == {"nni"}
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


@pytest.mark.parametrize("strategy", ["random", "regularized_evolution", "tpe"])
def test_strategies_are_reproducible_with_a_seed(joint, models, strategy: str, tmp_path: Path) -> None:
    first = search(joint, models, strategy, tmp_path / "a", seed=5).run()
    second = search(joint, models, strategy, tmp_path / "b", seed=5).run()
    np.testing.assert_array_equal(first.vectors, second.vectors)
    np.testing.assert_array_equal(first.scores.accuracy, second.scores.accuracy)


def test_infeasible_constraint_fails_before_nni_starts(joint, models, tmp_path: Path) -> None:
    runner = search(joint, models, "random", tmp_path / "nni", constraints={"bitops": 1.0e6})
    started = time.perf_counter()
    with pytest.raises(InfeasibleConstraintsError, match=r"bitops <= 1e\+06 \(smallest found: 2\.\d+e\+08, never met\)"):
        runner.run()
    assert time.perf_counter() - started < 10
    assert runner.experiment_id is None and len(runner.history) == 0


@pytest.mark.skipif(importlib.util.find_spec("tianshou") is not None, reason="tianshou is installed")
def test_policy_rl_without_tianshou_says_so() -> None:
    with pytest.raises(RecipeError, match="needs the tianshou package"):
        make_strategy("policy_rl")


def test_unknown_strategy_and_bad_options_are_refused(joint, models, tmp_path: Path) -> None:
    assert "policy_rl" in STRATEGIES
    with pytest.raises(ValueError, match="unknown NNI strategy 'bayes'"):
        NNISearch(joint, make_scorer(joint, models, {}), "bayes", 10, tmp_path)
    with pytest.raises(RecipeError, match=r"invalid options \{'gamma': 0.5\} for NNI strategy 'tpe'"):
        NNISearch(joint, make_scorer(joint, models, {}), "tpe", 10, tmp_path, options={"gamma": 0.5})
