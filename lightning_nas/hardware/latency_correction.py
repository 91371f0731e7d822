"""A learned correction of the latency table's sum, fitted on measured whole subnets.

The table's sum of units (:mod:`.latency_model`) ranks whole subnets well where a unit costs the
same inside every network, and less well where it does not (an AVX2-only CPU ranked subnets with a
Spearman of about 0.6 where an AVX-512 VNNI one reached 0.95, issue 24). In the spirit of nn-Meter's
learned predictors, a small ridge regression fitted on whole subnets measured on the machine
corrects the sum:

    log(measured) = log(table sum) + b + w . z(features)

``z`` standardises the features over the fitting subnets. The features of a subnet
(:func:`feature_names`) come from its config and the table:

* ``log_table_ms``: the log of the table's sum (a power law instead of a proportion);
* ``stage<s>_share``: the share of the sum spent in the blocks of stage ``s``;
* ``stage<s>_depth``: the running blocks of stage ``s`` (their sum is the number of units, less
  the fixed ones);
* ``r<resolution>``: one-hot resolution (a resolution-dependent factor);
* ``choice_changes``: consecutive running blocks whose (kernel, expand) differ, where the next
  block's kernels and their int8 weight layout differ from the previous one's.

The ridge penalty pulls ``w`` to zero, i.e. towards the table's own ranking: its strength is chosen
by leave-one-out error on the fitting subnets (closed form) among a fixed grid that includes
``w = 0`` (a plain scale of the table), and ties go to the stronger penalty. The fit is closed form
and so deterministic; which subnets it sees is decided by the seed of the profile
(:func:`~.latency_validation.correct_table`), which also judges it on the validation subnets only.

This module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_nas.hardware.counts import BlockDecomposition, CandidateArrays

__all__ = [
    "APPLY_MODES",
    "TooFewSubnets",
    "LatencyCorrection",
    "feature_names",
    "fit_correction",
    "improved",
    "subnet_features",
]

#: Penalties tried (features standardised), strongest first; ``inf`` (``w = 0``) is tried before them.
ALPHAS = tuple(10.0 ** k for k in np.arange(4.0, -2.5, -0.5))
#: When the profile applies a fitted correction: when it improves the held-out figures, always, never.
APPLY_MODES = ("if_better", "always", "never")
MIN_FIT_SUBNETS = 3


class TooFewSubnets(ValueError):
    """The space has too few subnets besides the validated ones to fit a correction on (a space
    the recipe made tiny): the profile stage names the recipe key."""


def feature_names(decomposition: BlockDecomposition) -> list[str]:
    """The names of :func:`subnet_features`' columns for a space (see the module docstring)."""
    d = decomposition
    return (["log_table_ms"] + [f"stage{s}_share" for s in range(d.num_stages)]
            + [f"stage{s}_depth" for s in range(d.num_stages)] + [f"r{r}" for r in d.resolutions]
            + ["choice_changes"])


def subnet_features(decomposition: BlockDecomposition, candidates: CandidateArrays, block_ms: np.ndarray,
                    table_ms: np.ndarray) -> np.ndarray:
    """Features (N, F) of N candidates: ``block_ms`` (N, B) is every block's table latency (0 where
    the block does not run), ``table_ms`` (N,) the table's sum of each whole subnet."""
    d = decomposition
    table_ms = np.asarray(table_ms, dtype=np.float64)
    if (table_ms <= 0).any():
        raise ValueError("the latency table predicts a non-positive latency; a correction works on its log")
    by_stage = np.eye(d.num_stages)[d.stage_of]  # (B, S)
    share = (block_ms @ by_stage) / table_ms[:, None]
    depth = candidates.active.astype(np.float64) @ by_stage
    resolution = np.eye(len(d.resolutions))[candidates.resolution]
    return np.column_stack([np.log(table_ms), share, depth, resolution, _choice_changes(d, candidates)])


def _choice_changes(d: BlockDecomposition, candidates: CandidateArrays) -> np.ndarray:
    code = candidates.kernel * len(d.expands) + candidates.expand
    n = len(code)
    last = np.full(n, -1)
    changes = np.zeros(n)
    for b in range(d.num_blocks):  # running blocks are a prefix of each stage, stages run in order
        running = candidates.active[:, b]
        changes += running & (last >= 0) & (code[:, b] != last)
        last = np.where(running, code[:, b], last)
    return changes


@dataclass(frozen=True)
class LatencyCorrection:
    """A fitted correction: ``log(ms) = log(table) + intercept + ((x - mean) / scale) . coef``.

    ``alpha`` is the chosen ridge penalty (None: ``coef = 0``, a plain scale of the table);
    ``loo_rmse`` the leave-one-out error of the log latency on the fitting subnets.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    alpha: float | None
    subnets: int
    loo_rmse: float

    def apply(self, table_ms: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Corrected latencies (ms) of candidates with the table's sums ``table_ms`` and ``features``."""
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.asarray(table_ms, dtype=np.float64) * np.exp(self.intercept + z @ np.asarray(self.coef))

    def to_record(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept, "alpha": self.alpha, "subnets": self.subnets,
                "loo_rmse": self.loo_rmse}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LatencyCorrection:
        return cls(tuple(record["features"]), tuple(float(v) for v in record["mean"]),
                   tuple(float(v) for v in record["scale"]), tuple(float(v) for v in record["coef"]),
                   float(record["intercept"]), None if record.get("alpha") is None else float(record["alpha"]),
                   int(record["subnets"]), float(record["loo_rmse"]))


def fit_correction(features: np.ndarray, table_ms: Sequence[float], measured_ms: Sequence[float],
                   names: Sequence[str], alphas: Sequence[float] = ALPHAS) -> LatencyCorrection:
    """Fit the ridge correction on subnets with ``features`` (N, F), table sums and measurements."""
    x = np.asarray(features, dtype=np.float64)
    table_ms, measured_ms = np.asarray(table_ms, dtype=np.float64), np.asarray(measured_ms, dtype=np.float64)
    n = len(x)
    if n < MIN_FIT_SUBNETS:
        raise ValueError(f"a correction needs at least {MIN_FIT_SUBNETS} measured subnets, got {n}")
    if x.shape != (n, len(names)) or table_ms.shape != (n,) or measured_ms.shape != (n,):
        raise ValueError(f"features {x.shape}, {len(names)} names, {table_ms.shape} sums, {measured_ms.shape} "
                         "measurements do not agree")
    if (measured_ms <= 0).any() or (table_ms <= 0).any():
        raise ValueError("latencies must be positive")
    y = np.log(measured_ms) - np.log(table_ms)
    mean = x.mean(axis=0)
    spread = x.std(axis=0)
    varying = spread > 1e-9 * np.maximum(1.0, np.abs(mean))  # constant over the fitting subnets: no information
    scale = np.where(varying, spread, 1.0)
    z = ((x - mean) / scale)[:, varying]
    yc = y - y.mean()
    # w = 0: the leave-one-out residual of a mean is the residual scaled by n / (n - 1)
    best_error, best_alpha = float(np.mean((yc * n / (n - 1)) ** 2)), None
    best_w = np.zeros(z.shape[1])
    gram, zy = z.T @ z, z.T @ yc
    for alpha in alphas:
        inverse = np.linalg.inv(gram + alpha * np.eye(len(gram)))
        w = inverse @ zy
        leverage = 1.0 / n + np.einsum("ij,jk,ik->i", z, inverse, z)
        if (leverage > 1 - 1e-6).any():  # the fit interpolates a subnet: its left-out error is undefined
            continue
        error = float(np.mean(((yc - z @ w) / (1 - leverage)) ** 2))
        if error < best_error * (1 - 1e-9):  # strictly better: ties keep the stronger penalty
            best_error, best_alpha, best_w = error, float(alpha), w
    coef = np.zeros(len(names))
    coef[varying] = best_w
    return LatencyCorrection(tuple(names), tuple(float(v) for v in mean), tuple(float(v) for v in scale),
                             tuple(float(v) for v in coef), float(y.mean()), best_alpha, n, math.sqrt(best_error))


def improved(raw: Mapping[str, Any], corrected: Mapping[str, Any]) -> bool:
    """Whether held-out ``corrected`` figures beat ``raw`` ones: Spearman not lower, median absolute
    error not higher, and one of them strictly better (a NaN Spearman never improves)."""
    sr, sc = raw.get("spearman"), corrected.get("spearman")
    er, ec = raw["median_abs_pct_error"], corrected["median_abs_pct_error"]
    if sc is None or (isinstance(sc, float) and math.isnan(sc)):
        return False
    if sr is None or (isinstance(sr, float) and math.isnan(sr)):
        return ec <= er
    return sc >= sr and ec <= er and (sc > sr or ec < er)
