"""Per-layer bit allocation under a budget: one integer program for every proxy.

A proxy in table form (``gain[l, j]``: the proxy's value of layer ``l`` at the ``j``-th bit
width, higher predicted better) and a cost table of the same shape (bytes of the weights, or
BitOps) define a multiple-choice knapsack: choose one bit width per layer, maximise the summed
gain, keep the summed cost within the budget. It is solved exactly by CBC through PuLP (the
solver HAWQ-V3 uses), the same way for every proxy. A greedy allocation (start at the lowest bits,
upgrade by the best gain per cost while it fits) and budget-respecting random configurations are
here as baselines.

This module must not import torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# CBC's integrality tolerance can accept a cost a rounding error above the budget; the solution is
# checked against the exact budget afterwards.
_BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class Allocation:
    """Chosen bit-choice index per layer, with its summed gain and cost."""

    choice: tuple[int, ...]
    gain: float
    cost: float
    status: str


def _check(gain: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gain, cost = np.asarray(gain, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    if gain.shape != cost.shape or gain.ndim != 2:
        raise ValueError(f"gain and cost must be tables of the same shape [layers, choices]; got {gain.shape} "
                         f"and {cost.shape}")
    if not (np.isfinite(gain).all() and np.isfinite(cost).all()):
        raise ValueError("gain and cost tables must be finite")
    return gain, cost


def _summary(choice: np.ndarray, gain: np.ndarray, cost: np.ndarray, status: str) -> Allocation:
    layers = np.arange(len(choice))
    return Allocation(tuple(int(c) for c in choice), float(gain[layers, choice].sum()),
                      float(cost[layers, choice].sum()), status)


def ilp_allocation(gain: np.ndarray, cost: np.ndarray, budget: float, time_limit: float | None = 60.0) -> Allocation:
    """Maximise ``sum gain[l, c_l]`` subject to ``sum cost[l, c_l] <= budget`` (CBC, exact).

    Raises ``ValueError`` when even the cheapest configuration exceeds the budget.
    """
    import pulp

    gain, cost = _check(gain, cost)
    layers, choices = gain.shape
    if cost.min(axis=1).sum() > budget * (1 + _BUDGET_SLACK):
        raise ValueError(f"budget {budget:g} is below the cheapest configuration ({cost.min(axis=1).sum():g})")
    # Gains are rescaled so CBC's absolute tolerances mean the same for every proxy's units.
    scale = float(np.abs(gain).max()) or 1.0
    problem = pulp.LpProblem("bit_allocation", pulp.LpMaximize)
    x = [[pulp.LpVariable(f"x_{layer}_{j}", cat="Binary") for j in range(choices)] for layer in range(layers)]
    problem += pulp.lpSum(float(gain[layer, j] / scale) * x[layer][j]
                          for layer in range(layers) for j in range(choices))
    for layer in range(layers):
        problem += pulp.lpSum(x[layer]) == 1
    problem += pulp.lpSum(float(cost[layer, j]) * x[layer][j] for layer in range(layers) for j in range(choices)) \
        <= float(budget)
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0)
    problem.solve(solver)
    status = pulp.LpStatus[problem.status]
    if status != "Optimal":
        raise RuntimeError(f"CBC ended with status {status}")
    choice = np.array([int(np.argmax([x[layer][j].value() or 0.0 for j in range(choices)])) for layer in range(layers)])
    result = _summary(choice, gain, cost, status)
    if result.cost > budget * (1 + _BUDGET_SLACK):
        raise RuntimeError(f"CBC returned a configuration of cost {result.cost:g} above the budget {budget:g}")
    return result


def greedy_allocation(gain: np.ndarray, cost: np.ndarray, budget: float) -> Allocation:
    """Start every layer at its cheapest choice; repeatedly take the upgrade with the best gain per
    unit of cost that still fits, until none does."""
    gain, cost = _check(gain, cost)
    choice = cost.argmin(axis=1)
    layers = np.arange(gain.shape[0])
    total = float(cost[layers, choice].sum())
    if total > budget * (1 + _BUDGET_SLACK):
        raise ValueError(f"budget {budget:g} is below the cheapest configuration ({total:g})")
    while True:
        best, best_ratio = None, 0.0
        for layer in layers:
            for j in range(gain.shape[1]):
                extra = cost[layer, j] - cost[layer, choice[layer]]
                delta = gain[layer, j] - gain[layer, choice[layer]]
                if extra <= 0 or delta <= 0 or total + extra > budget * (1 + _BUDGET_SLACK):
                    continue
                if delta / extra > best_ratio:
                    best, best_ratio = (layer, j), delta / extra
        if best is None:
            return _summary(choice, gain, cost, "greedy")
        total += cost[best[0], best[1]] - cost[best[0], choice[best[0]]]
        choice[best[0]] = best[1]


def random_feasible(cost: np.ndarray, budget: float, rng: random.Random) -> tuple[int, ...]:
    """A uniformly random configuration, then random layers lowered one step until it fits.

    Plain rejection almost never accepts a budget well below the mean (18 layers of {2, 3, 4} bits
    under a mean of 2.5: about 1 in 200); repairing downwards keeps the draw random and close to
    the budget, as a random search at that budget would be.
    """
    cost = np.asarray(cost, dtype=np.float64)
    order = np.argsort(cost, axis=1)  # per layer: choices from cheapest to dearest
    rank = [rng.randrange(cost.shape[1]) for _ in range(cost.shape[0])]

    def total() -> float:
        return float(sum(cost[layer, order[layer, r]] for layer, r in enumerate(rank)))

    if cost.min(axis=1).sum() > budget * (1 + _BUDGET_SLACK):
        raise ValueError(f"budget {budget:g} is below the cheapest configuration")
    while total() > budget * (1 + _BUDGET_SLACK):
        lowerable = [layer for layer, r in enumerate(rank) if r > 0]
        rank[rng.choice(lowerable)] -= 1
    return tuple(int(order[layer, r]) for layer, r in enumerate(rank))
