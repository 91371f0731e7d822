from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from lightning_nas.search.bit_allocation import greedy_allocation, ilp_allocation, random_feasible


def brute_force(gain: np.ndarray, cost: np.ndarray, budget: float) -> float:
    best = -np.inf
    for choice in itertools.product(range(gain.shape[1]), repeat=gain.shape[0]):
        rows = np.arange(len(choice))
        if cost[rows, choice].sum() <= budget:
            best = max(best, gain[rows, choice].sum())
    return float(best)


def test_ilp_meets_the_budget_exactly_when_the_optimum_uses_all_of_it() -> None:
    # weights of 3 layers with 100, 200 and 300 parameters at 2/3/4 bits; the gain is the cost plus
    # a small per-layer preference, so the optimum spends the whole budget, and among the three
    # configurations costing exactly 1,900 bits (4-3-3, 2-4-3, 3-2-4) it prefers 4-3-3
    params = np.array([100.0, 200.0, 300.0])
    bits = np.array([2, 3, 4])
    cost = params[:, None] * bits[None, :] / 8
    gain = cost * (1 + np.array([[0.003], [0.002], [0.001]]))
    budget = float((params * np.array([4, 3, 3])).sum() / 8)  # 3.33 mean bits, reachable exactly
    allocation = ilp_allocation(gain, cost, budget)
    assert allocation.cost == pytest.approx(budget)
    assert allocation.cost <= budget
    assert allocation.gain == pytest.approx(brute_force(gain, cost, budget))
    assert allocation.choice == (2, 1, 1)


def test_ilp_beats_greedy_on_a_knapsack_trap() -> None:
    # layer 0: upgrade costs 2 and gains 5 (2.5 per unit); layer 1: costs 1 and gains 3 (3 per unit).
    # Greedy takes layer 1 first and then cannot afford layer 0; the optimum upgrades layer 0 only.
    gain = np.array([[0.0, 5.0], [0.0, 3.0]])
    cost = np.array([[1.0, 3.0], [1.0, 2.0]])
    greedy = greedy_allocation(gain, cost, budget=4.0)
    ilp = ilp_allocation(gain, cost, budget=4.0)
    assert greedy.choice == (0, 1) and greedy.gain == 3.0
    assert ilp.choice == (1, 0) and ilp.gain == 5.0 and ilp.cost == 4.0


@pytest.mark.parametrize("seed", range(4))
def test_ilp_is_optimal_on_random_instances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gain = rng.normal(size=(5, 3))
    cost = np.sort(rng.uniform(1, 10, size=(5, 3)), axis=1)
    budget = float(cost.min(axis=1).sum() + rng.uniform(0, cost.max(axis=1).sum() - cost.min(axis=1).sum()))
    allocation = ilp_allocation(gain, cost, budget)
    assert allocation.cost <= budget + 1e-9
    assert allocation.gain == pytest.approx(brute_force(gain, cost, budget), abs=1e-9)
    assert greedy_allocation(gain, cost, budget).gain <= allocation.gain + 1e-9


def test_infeasible_budget_and_bad_tables_are_errors() -> None:
    cost = np.array([[2.0, 3.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="below the cheapest"):
        ilp_allocation(np.zeros((2, 2)), cost, budget=3.0)
    with pytest.raises(ValueError, match="same shape"):
        ilp_allocation(np.zeros((2, 3)), cost, budget=10.0)
    with pytest.raises(ValueError, match="finite"):
        ilp_allocation(np.array([[np.nan, 0.0], [0.0, 0.0]]), cost, budget=10.0)


def test_random_feasible_configs_fit_and_vary() -> None:
    cost = np.tile(np.array([2.0, 3.0, 4.0]), (18, 1))
    budget = 18 * 2.5
    rng = random.Random(0)
    draws = [random_feasible(cost, budget, rng) for _ in range(20)]
    rows = np.arange(18)
    assert all(cost[rows, list(d)].sum() <= budget for d in draws)
    assert len(set(draws)) == 20
    assert all(cost[rows, list(d)].sum() >= budget - 1.0 for d in draws)  # repaired one step at a time
