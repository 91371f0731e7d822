"""APQ's evolution as an NNI strategy: the same search as the direct loop, through NNI's engines."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from test_evolution import CONSTRAINTS, linear_predictor, truth

from lightning_nas.errors import RecipeError
from lightning_nas.hardware.cost_models import CountsCostModel
from lightning_nas.search.evolution import APQEvolution
from lightning_nas.search.joint_space import JointSpace
from lightning_nas.search.nni_strategies import NNISearch
from lightning_nas.search.scoring import InfeasibleConstraintsError, Scorer
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.quant_policy import QuantPolicySpace

OPTIONS = {"population_size": 40, "parents": 10, "mutations": 20}


pytestmark = pytest.mark.usefixtures("one_thread")


def scorer_for(joint, models, constraints=CONSTRAINTS) -> Scorer:
    return Scorer(joint, linear_predictor(joint.space, joint.policy_space), models, constraints)


def direct(joint, models, evaluations=400, seed=0, constraints=CONSTRAINTS, **kwargs) -> APQEvolution:
    evolution = APQEvolution(joint, scorer_for(joint, models, constraints), evaluations=evaluations, seed=seed,
                             **{**OPTIONS, **kwargs})
    evolution.run()
    return evolution


def through_nni(joint, models, directory: Path, evaluations=400, seed=0, constraints=CONSTRAINTS,
                engine="batched", concurrency=100, **kwargs) -> NNISearch:
    search = NNISearch(joint, scorer_for(joint, models, constraints), "apq_evolution", evaluations, directory,
                       seed=seed, options={**OPTIONS, **kwargs}, engine=engine, concurrency=concurrency)
    search.run()
    return search


def assert_same_search(reference: APQEvolution, search: NNISearch, exact: bool = True) -> None:
    ours, theirs = search.history, reference.history
    np.testing.assert_array_equal(ours.vectors, theirs.vectors)
    if exact:
        np.testing.assert_array_equal(ours.scores.accuracy, theirs.scores.accuracy)
    else:  # predictor batches of another size: float32 sums in another order
        np.testing.assert_allclose(ours.scores.accuracy, theirs.scores.accuracy, atol=1e-4)
    for metric in theirs.metrics:
        np.testing.assert_array_equal(ours.scores.costs[metric], theirs.scores.costs[metric])
    np.testing.assert_array_equal(ours.generation, theirs.generation)
    assert ours.origin == theirs.origin
    assert ours.top_k(10) == theirs.top_k(10)
    stats = search.evolution.stats
    for key in ("generations", "rejected", "empty_slots", "selected", "evaluations"):
        assert stats[key] == reference.stats[key], key
    assert [m.key for m in search.evolution.population] == [m.key for m in reference.population]


def test_equals_the_direct_loop_for_the_same_seed(joint, models, tmp_path: Path) -> None:
    reference = direct(joint, models, seed=3)
    # one generation per batch: the same predictor calls as the direct loop, bit for bit
    assert_same_search(reference, through_nni(joint, models, tmp_path / "a", seed=3))
    # fewer in flight than a generation: the strategy waits for its generation all the same
    assert_same_search(reference, through_nni(joint, models, tmp_path / "b", seed=3, concurrency=7), exact=False)
    # NNI's sequential engine: one trial per child
    assert_same_search(reference, through_nni(joint, models, tmp_path / "c", seed=3, engine="sequential"),
                       exact=False)


def test_a_generation_is_one_batch_and_every_child_is_feasible(joint, models, tmp_path: Path) -> None:
    search = NNISearch(joint, scorer_for(joint, models), "apq_evolution", 400, tmp_path, options=OPTIONS)
    calls = []
    original = search.scorer.predictor.forward
    search.scorer.predictor.forward = lambda *args: calls.append(len(args[0])) or original(*args)
    history = search.run()
    assert calls == [40] * 10 and len(history) == 400
    assert history.scores.feasible.all()  # rejection: nothing infeasible is scored
    top = [history.candidate(i) for i in history.top_k(10)]
    configs, policies = [c.config for c in top], [c.policy for c in top]
    direct_costs = {**models["counts"].evaluate(configs, policies), **models["bitfusion"].evaluate(configs, policies)}
    for metric, limit in CONSTRAINTS.items():
        assert (direct_costs[metric] <= limit).all(), metric
    # the cost checks of the rejection rounds are not repeated when the children are scored
    assert search.scorer.cost_evaluations == 400 + search.evolution.stats["rejected"]
    np.testing.assert_allclose(history.scores.accuracy[history.top_k(10)], [truth(joint, c) for c in top], atol=1e-3)
    experiment = tmp_path / search.experiment_id
    assert '"name": "batched"' in (experiment / "checkpoint" / "config.json").read_text()


def test_finds_the_known_optimum_of_a_toy_predictor_as_before(tmp_path: Path) -> None:
    # a small space on which the linear toy predictor's optimum, the largest candidate at the
    # highest bits (no constraint), is reachable: 61 binary decisions that matter
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", resolutions=[28, 32], kernel_choices=[3, 7], expand_choices=[3, 6],
                                     depth_choices=[2])
    joint = JointSpace(space, QuantPolicySpace([4, 8]))
    counts = {"counts": CountsCostModel(space, bit_choices=[4, 8])}

    def scorer() -> Scorer:
        return Scorer(joint, linear_predictor(space, joint.policy_space), counts)

    before = APQEvolution(joint, scorer(), evaluations=1200, seed=0, **OPTIONS)
    before.run()
    search = NNISearch(joint, scorer(), "apq_evolution", 1200, tmp_path, options=OPTIONS)
    history = search.run()
    best, best_before = history.candidate(history.top_k(1)[0]), before.history.candidate(before.history.top_k(1)[0])
    optimum = joint.largest()
    assert joint.key(best) == joint.key(best_before) == joint.key(optimum)
    assert history.scores.accuracy[history.top_k(1)[0]] == pytest.approx(truth(joint, optimum), abs=1e-3)
    assert history.top_k(1) == before.history.top_k(1)


def test_infeasible_constraints_fail_before_the_budget_is_spent(joint, models, tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(InfeasibleConstraintsError, match=r"bitops <= 1e\+06 \(smallest found: 2\.\d+e\+08, never met\)"):
        through_nni(joint, models, tmp_path, evaluations=50_000, constraints={"bitops": 1.0e6}, max_tries=20)
    assert time.perf_counter() - started < 20


def test_a_tight_constraint_is_met_from_the_smallest_candidate(joint, models, tmp_path: Path) -> None:
    smallest = models["counts"].evaluate([joint.smallest().config], [joint.smallest().policy])["bitops"][0]
    search = through_nni(joint, models, tmp_path, evaluations=100, constraints={"bitops": smallest * 1.02},
                         max_tries=5)
    assert search.history.origin[0] == "smallest"
    assert (search.history.scores.costs["bitops"] <= smallest * 1.02).all()


def test_bad_options_are_refused(joint, models, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parents must be in"):
        NNISearch(joint, scorer_for(joint, models), "apq_evolution", 10, tmp_path,
                  options={"population_size": 10, "parents": 20})
    with pytest.raises(RecipeError, match=r"search.strategy_options: invalid options .* for strategy 'apq_evolution'"):
        NNISearch(joint, scorer_for(joint, models), "apq_evolution", 10, tmp_path, options={"sample_size": 3})
