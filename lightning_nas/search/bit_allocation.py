"""Per-layer bit allocation under a budget: one integer program for every proxy.

A proxy in table form (``gain[l, j]``: the proxy's value of layer ``l`` at the ``j``-th bit
width, higher predicted better) and a cost table of the same shape (bytes of the weights, or
BitOps) define a multiple-choice knapsack: choose one bit width per layer, maximise the summed
gain, keep the summed cost within the budget. It is solved exactly as an integer program by
HiGHS (through ``scipy.optimize.milp``; HAWQ-V3 uses CBC through PuLP), the same way for every
proxy. A greedy allocation (start at the lowest bits,
upgrade by the best gain per cost while it fits) and budget-respecting random configurations are
here as baselines.

This module must not import torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# The solver's integrality tolerance can accept a cost a rounding error above the budget; the solution is
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
    """Maximise ``sum gain[l, c_l]`` subject to ``sum cost[l, c_l] <= budget`` (HiGHS, exact).

    Raises ``ValueError`` when even the cheapest configuration exceeds the budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    gain, cost = _check(gain, cost)
    layers, choices = gain.shape
    if cost.min(axis=1).sum() > budget * (1 + _BUDGET_SLACK):
        raise ValueError(f"budget {budget:g} is below the cheapest configuration ({cost.min(axis=1).sum():g})")
    # Gains are rescaled so the solver's absolute tolerances mean the same for every proxy's units.
    scale = float(np.abs(gain).max()) or 1.0
    one_per_layer = np.kron(np.eye(layers), np.ones(choices))
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0),
                   LinearConstraint(cost.reshape(1, -1), -np.inf, float(budget))]
    options = {"mip_rel_gap": 0.0, **({"time_limit": float(time_limit)} if time_limit is not None else {})}
    solution = milp(-(gain / scale).ravel(), constraints=constraints, integrality=np.ones(gain.size),
                    bounds=Bounds(0.0, 1.0), options=options)
    # status 0: proven optimal; 1: a limit was reached (the incumbent is not proven optimal).
    if solution.status != 0 or solution.x is None:
        raise RuntimeError(f"the integer program ended without a proven optimum: {solution.message}")
    choice = solution.x.reshape(layers, choices).argmax(axis=1)
    result = _summary(choice, gain, cost, "Optimal")
    if result.cost > budget * (1 + _BUDGET_SLACK):
        raise RuntimeError(f"the solver returned a configuration of cost {result.cost:g} above the budget {budget:g}")
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
