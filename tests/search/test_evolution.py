"""Batched scoring (predictor + cost models + constraints) and the APQ evolution."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from lightning_nas.errors import RecipeError
from lightning_nas.hardware.cost_models import BitFusionCostModel
from lightning_nas.predictors.accuracy import AccuracyPredictor, QuantAccuracyPredictor
from lightning_nas.search.evolution import APQEvolution
from lightning_nas.search.joint_space import Candidate, JointSpace
from lightning_nas.search.scoring import InfeasibleConstraintsError, Scorer, pareto_mask, probe_feasible
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.quant_policy import POLICY_KEYS, QuantPolicySpace

BASE = 70.0


def linear_predictor(space, policy_space=None) -> AccuracyPredictor:
    """A predictor whose output is known exactly: BASE + resolution index + 0.5 x (kernel index +
    expand index) per running block + 0.3 x bit index per running policy entry. One hidden unit
    kept in the ReLU's linear range by a +100 bias that the output removes."""
    nr, nk, ne = len(space.resolutions), len(space.kernel_choices), len(space.expand_choices)
    arch = [float(i) for i in range(nr)]
    for _ in range(space.num_blocks):
        arch += [0.5 * i for i in range(nk)] + [0.5 * i for i in range(ne)]
    if policy_space is None:
        model = AccuracyPredictor(space.encoding_size, hidden=1, layers=1, base_accuracy=BASE)
    else:
        model = QuantAccuracyPredictor(space.encoding_size, policy_space.encoding_size(space.num_blocks), hidden=1,
                                       layers=1, base_accuracy=BASE)
    with torch.no_grad():
        model.first.weight.copy_(torch.tensor([arch]))
        model.first.bias.fill_(100.0)
        model.rest[1].weight.fill_(1.0)
        model.rest[1].bias.fill_(-100.0)
        if policy_space is not None:
            nb = len(policy_space.bit_choices)
            bits = [0.3 * i for i in range(nb)] * (space.num_blocks * len(POLICY_KEYS))
            model.policy_branch.weight.copy_(torch.tensor([bits]))
            model.policy_branch.bias.zero_()
    return model


def truth(joint: JointSpace, c: Candidate) -> float:
    s = joint.space
    value = BASE + s.resolutions.index(c.config["r"])
    for b in s.active_blocks(c.config):
        value += 0.5 * (s.kernel_choices.index(c.config["ks"][b]) + s.expand_choices.index(c.config["e"][b]))
        if c.policy is not None:
            value += sum(0.3 * joint.policy_space.bit_choices.index(c.policy[k][b]) for k in POLICY_KEYS)
    return value


pytestmark = pytest.mark.usefixtures("one_thread")


def scorer_for(joint, models, constraints=None, **kwargs) -> Scorer:
    return Scorer(joint, linear_predictor(joint.space, joint.policy_space), models, constraints, **kwargs)


# ------------------------------------------------------------------------------------- scoring


def test_scorer_predicts_through_the_training_encoding_in_batches(joint, models) -> None:
    scorer = scorer_for(joint, models, batch_size=7)
    rng = random.Random(0)
    candidates = [joint.sample(rng) for _ in range(30)]
    accuracy = scorer.accuracy(candidates)
    np.testing.assert_allclose(accuracy, [truth(joint, c) for c in candidates], atol=1e-3)
    assert scorer.predictions == 30


def test_scorer_costs_and_feasibility_match_the_cost_models(joint, models) -> None:
    scorer = scorer_for(joint, models, {"latency_ms": 0.45, "bitops": 6e8})
    assert scorer.metrics == ["macs", "params", "bitops", "size_bytes", "latency_ms", "energy_mj"]
    rng = random.Random(1)
    candidates = [joint.sample(rng) for _ in range(40)]
    scores = scorer.score(candidates)
    configs, policies = [c.config for c in candidates], [c.policy for c in candidates]
    direct = {**models["counts"].evaluate(configs, policies), **models["bitfusion"].evaluate(configs, policies)}
    for metric in scorer.metrics:
        np.testing.assert_allclose(scores.costs[metric], direct[metric])
    expected = (direct["latency_ms"] <= 0.45) & (direct["bitops"] <= 6e8)
    assert 0 < expected.sum() < 40
    np.testing.assert_array_equal(scores.feasible, expected)
    assert scorer.smallest_seen["bitops"] == pytest.approx(direct["bitops"].min())
    np.testing.assert_allclose(scorer.penalty(scores.costs)[expected], 0.0)
    assert (scorer.penalty(scores.costs)[~expected] > 0).all()


def test_clashing_metrics_are_qualified_with_the_model_name(joint) -> None:
    slow = BitFusionCostModel(joint.space, frequency_mhz=250)
    scorer = Scorer(joint, linear_predictor(joint.space, joint.policy_space),
                    [BitFusionCostModel(joint.space), slow], {"bitfusion_2_latency_ms": 1.0})
    assert scorer.metrics == ["bitfusion_latency_ms", "bitfusion_energy_mj", "bitfusion_2_latency_ms",
                              "bitfusion_2_energy_mj"]
    costs = scorer.costs([joint.smallest()])
    assert costs["bitfusion_2_latency_ms"][0] > costs["bitfusion_latency_ms"][0]
    with pytest.raises(RecipeError, match=r"constraint on 'latency_ms', but no cost model reports it"):
        Scorer(joint, linear_predictor(joint.space, joint.policy_space), [BitFusionCostModel(joint.space), slow],
               {"latency_ms": 1.0})


def test_scorer_refuses_mismatched_predictors_and_cost_models(joint, models) -> None:
    with pytest.raises(RecipeError, match="quantization-aware predictor"):
        Scorer(joint, linear_predictor(joint.space), models)
    fp32 = JointSpace(joint.space)
    with pytest.raises(RecipeError, match="full-precision predictor"):
        Scorer(fp32, linear_predictor(joint.space, joint.policy_space), models)
    other = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", resolutions=[28, 32])
    with pytest.raises(RecipeError, match="trained for another space"):
        Scorer(JointSpace(other, joint.policy_space), linear_predictor(joint.space, joint.policy_space), {})
    with pytest.raises(RecipeError, match="give both the same space spec"):
        Scorer(JointSpace(other, joint.policy_space), linear_predictor(other, joint.policy_space), models)
    with pytest.raises(RecipeError, match=r"prices bit widths \[4, 6, 8\]"):
        Scorer(JointSpace(joint.space, QuantPolicySpace([2, 4, 8])),
               linear_predictor(joint.space, QuantPolicySpace([2, 4, 8])), models)


def test_pareto_mask() -> None:
    accuracy = np.array([70.0, 72.0, 71.0, 72.0, 75.0, 60.0])
    cost = np.array([1.0, 2.0, 3.0, 2.0, 5.0, 0.5])
    np.testing.assert_array_equal(pareto_mask(accuracy, cost), [1, 1, 0, 0, 1, 1])
    feasible = np.array([1, 1, 1, 1, 0, 1], dtype=bool)
    np.testing.assert_array_equal(pareto_mask(accuracy, cost, feasible), [1, 1, 0, 0, 0, 1])


# ------------------------------------------------------------------------------------- evolution

CONSTRAINTS = {"latency_ms": 0.45, "energy_mj": 0.6, "bitops": 6.0e8}


def small_evolution(joint, models, constraints=CONSTRAINTS, seed=0, **kwargs) -> APQEvolution:
    options = {"population_size": 40, "parents": 10, "mutations": 20, "evaluations": 400, "seed": seed, **kwargs}
    return APQEvolution(joint, scorer_for(joint, models, constraints), **options)


def test_returned_candidates_satisfy_every_constraint(joint, models) -> None:
    evolution = small_evolution(joint, models)
    history = evolution.run()
    assert len(history) == 400
    assert evolution.stats["rejected"] > 0  # the constraints bind: about 8 % of random candidates pass
    top = [history.candidate(i) for i in history.top_k(10)]
    assert len(top) == 10
    configs, policies = [c.config for c in top], [c.policy for c in top]
    direct = {**models["counts"].evaluate(configs, policies), **models["bitfusion"].evaluate(configs, policies)}
    for metric, limit in CONSTRAINTS.items():
        assert (direct[metric] <= limit).all(), metric
    assert history.scores.feasible.all()  # rejection sampling: nothing infeasible is ever scored
    accuracy = history.scores.accuracy[history.top_k(10)]
    assert (np.diff(accuracy) <= 0).all()
    np.testing.assert_allclose(accuracy, [truth(joint, c) for c in top], atol=1e-3)


def test_selection_improves_on_the_initial_population(joint, models) -> None:
    evolution = small_evolution(joint, models)
    history = evolution.run()
    initial = history.scores.accuracy[history.generation == 0]
    assert len(initial) == 40
    parents = [m.accuracy for m in evolution.population]
    assert np.mean(parents) > np.max(initial)


def test_crossover_children_are_kept_and_selected(joint, models) -> None:
    evolution = small_evolution(joint, models)
    history = evolution.run()
    generations = history.generation
    origins = np.array(history.origin)
    for g in range(1, generations.max() + 1):
        assert (origins[generations == g] == "crossover").sum() == 20
        assert (origins[generations == g] == "mutation").sum() == 20
    assert sum(s.get("crossover", 0) for s in evolution.stats["selected"]) > 0
    # with crossover alone the search can only improve if crossover children join the pool
    only_crossover = small_evolution(joint, models, mutations=0)
    history = only_crossover.run()
    assert set(history.origin) == {"random", "crossover"}
    assert history.scores.accuracy.max() > history.scores.accuracy[history.generation == 0].max()


def test_a_generation_is_scored_in_one_predictor_call(joint, models) -> None:
    evolution = small_evolution(joint, models)
    calls = []
    predictor = evolution.scorer.predictor
    original = predictor.forward
    predictor.forward = lambda *args: calls.append(len(args[0])) or original(*args)
    history = evolution.run()
    assert sum(calls) == len(history) == 400
    assert calls == [40] * 10  # the initial population, then 9 generations of 40 children


def test_results_are_reproducible_with_a_seed(joint, models) -> None:
    first = small_evolution(joint, models, seed=3).run()
    second = small_evolution(joint, models, seed=3).run()
    np.testing.assert_array_equal(first.vectors, second.vectors)
    np.testing.assert_array_equal(first.scores.accuracy, second.scores.accuracy)
    other = small_evolution(joint, models, seed=4).run()
    assert not np.array_equal(first.vectors, other.vectors)


def test_an_infeasible_constraint_fails_quickly_with_the_smallest_value(joint, models) -> None:
    smallest_bitops = models["counts"].evaluate([joint.smallest().config], [joint.smallest().policy])["bitops"][0]
    evolution = small_evolution(joint, models, {"bitops": 1e6, "latency_ms": 10.0}, max_tries=20)
    started = time.perf_counter()
    with pytest.raises(InfeasibleConstraintsError) as caught:
        evolution.run()
    assert time.perf_counter() - started < 15
    error = caught.value
    assert error.smallest["bitops"] == pytest.approx(smallest_bitops)  # the smallest network, lowest bits
    message = str(error)
    assert "bitops <= 1e+06" in message and f"smallest found: {smallest_bitops:g}, never met" in message
    assert "latency_ms <= 10" in message and "met alone" in message
    assert error.tried == 40 * 20 + 1  # the capped draws, then the smallest candidate
    with pytest.raises(InfeasibleConstraintsError):
        probe_feasible(joint, scorer_for(joint, models, {"bitops": 1e6}), samples=50)


def test_a_tight_constraint_is_met_from_the_smallest_candidate(joint, models) -> None:
    # only networks close to the smallest one pass: random draws fail, the smallest seeds the search
    smallest = models["counts"].evaluate([joint.smallest().config], [joint.smallest().policy])["bitops"][0]
    evolution = small_evolution(joint, models, {"bitops": smallest * 1.02}, max_tries=5, evaluations=100)
    history = evolution.run()
    assert history.origin[0] == "smallest"
    assert (history.scores.costs["bitops"] <= smallest * 1.02).all()


def test_invalid_settings_are_refused(joint, models) -> None:
    with pytest.raises(ValueError, match="parents must be in"):
        APQEvolution(joint, scorer_for(joint, models), population_size=10, parents=20)
    with pytest.raises(ValueError, match="mutation_prob must be a probability"):
        APQEvolution(joint, scorer_for(joint, models), mutation_prob=1.5)
