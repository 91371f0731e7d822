"""The table latency model: a subnet's latency is the sum of its units' latencies in a table.

Tabulated per ``(resolution, block, kernel, expand)`` so a batch of candidates costs a few array
gathers. A runtime that runs a whole network in one call (ONNX Runtime) pays its call overhead
once per network but once per unit in the table: the table's ``Overhead`` entry is taken off for
every unit but one. How well the sum predicts whole subnets on a machine is measured by
:mod:`.latency_validation` and recorded in the table (``meta["validation"]``); the model exposes
it as :attr:`TableLatencyModel.validation`. A table may also carry a learned correction of the sum
fitted on measured whole subnets (``meta["correction"]``, :mod:`.latency_correction`); the model
applies it when asked (``correction=True``) and the profile marked it applied.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_nas.hardware.counts import CandidateArrays
from lightning_nas.hardware.latency_correction import LatencyCorrection, feature_names, subnet_features
from lightning_nas.hardware.latency_keys import Unit, UnitDecomposition
from lightning_nas.hardware.latency_table import OVERHEAD_KEY, LatencyTable
from lightning_nas.spaces.protocol import ElasticSpace

__all__ = ["TableLatencyModel"]


class TableLatencyModel:
    """Whole-network latency from a table: the sum of the network's units (ms per batch).

    Args:
        space: an OFA MobileNetV3 space object.
        table: a :class:`LatencyTable` or a path to one (JSON, or OFA YAML read as ``precision``).
        precision: which of the table's precisions to use.
        stat: ``median`` (falls back to ``mean`` for OFA tables) or ``mean``.
        resolutions: only tabulate these resolutions (default: every resolution of the space);
            candidates at others are refused.
        correction: apply the table's learned correction for ``precision`` where the profile
            marked it applied (default: the plain sum, as the validation of the table needs it).
    """

    def __init__(self, space: ElasticSpace, table: LatencyTable | str | os.PathLike[str], precision: str = "fp32",
                 stat: str = "median", resolutions: Sequence[int] | None = None,
                 units: UnitDecomposition | None = None, correction: bool = False) -> None:
        self.space = space
        self.table = table if isinstance(table, LatencyTable) else LatencyTable.load(table, precision)
        if precision not in self.table.entries:
            raise ValueError(f"the latency table has no '{precision}' entries; it has {self.table.precisions}")
        self.precision, self.stat = precision, stat
        self.units = units or UnitDecomposition(space)
        d = self.units.decomposition
        wanted = set(d.resolutions if resolutions is None else resolutions)
        missing: list[str] = []

        def look(unit: Unit) -> float:
            try:
                return self.table.value(precision, unit.key, stat)
            except KeyError:
                if unit.key not in missing:
                    missing.append(unit.key)
                return np.nan

        shape = (len(d.resolutions), d.num_blocks, len(d.kernels), len(d.expands))
        self.block_latency = np.full(shape, np.nan)
        self.fixed_latency = np.full(len(d.resolutions), np.nan)
        for ri, r in enumerate(d.resolutions):
            if r not in wanted:
                continue
            self.fixed_latency[ri] = sum(look(u) for u in self.units.fixed[ri])
            for b in range(shape[1]):
                for ki in range(shape[2]):
                    for ei in range(shape[3]):
                        self.block_latency[ri, b, ki, ei] = look(self.units.blocks[ri][b][ki][ei])
        if missing:
            raise ValueError(
                f"the latency table lacks {len(missing)} '{precision}' entries the space needs, e.g. "
                f"{missing[:3]}; profile them (lightning-nas profile) or restrict the resolutions"
            )
        # A runtime that runs a whole network in one call pays its call overhead once, the table
        # once per unit; units per network = fixed units + running blocks.
        self.call_overhead = (
            self.table.value(precision, OVERHEAD_KEY, stat) if (precision, OVERHEAD_KEY) in self.table else 0.0
        )
        self._fixed_units = len(self.units.fixed[0])
        #: the table's correction record for this precision (None: none was fitted)
        self.correction_record = table_correction(self.table, precision)
        #: the correction this model applies (None: the plain sum)
        self.correction: LatencyCorrection | None = None
        if correction and self.correction_record is not None and self.correction_record.get("applied"):
            fitted_stat = self.correction_record.get("stat", "median")
            if fitted_stat != stat:
                raise ValueError(f"the latency table's '{precision}' correction was fitted on the {fitted_stat}s of "
                                 f"whole subnets, not their {stat}s: use stat {fitted_stat} or no correction")
            fitted = LatencyCorrection.from_record(self.correction_record["model"])
            if list(fitted.features) != feature_names(d):
                raise ValueError(f"the latency table's '{precision}' correction was fitted for another space "
                                 f"(features {list(fitted.features)[:4]}...)")
            self.correction = fitted

    @property
    def validation(self) -> dict[str, Any] | None:
        """The table's whole-subnet check for this model's precision (``spearman``,
        ``median_abs_pct_error``, ``subnets``, ``passed``, ...), None when the table was not validated.

        Where the table carries a correction, ``correction`` holds its held-out figures (``raw``,
        ``corrected``, on the validation subnets), whether the profile marked it applied and whether
        this model applies it; when it does, the top-level figures are the corrected ones (what this
        model predicts) and ``predictor`` says ``table+correction``."""
        figures = table_validation(self.table, self.precision)
        record = self.correction_record
        if record is None:
            return figures
        held_out = record["held_out"]
        info = {"applied": self.correction is not None, "applied_by_profile": bool(record.get("applied")),
                "improved": bool(record.get("improved")), "fit_subnets": record.get("fit_subnets"),
                "alpha": record["model"].get("alpha"), "raw": held_out["raw"], "corrected": held_out["corrected"]}
        figures = dict(figures or {})
        if self.correction is not None:
            figures.update(held_out["corrected"], predictor="table+correction")
        return {**figures, "correction": info}

    def _sum(self, configs: Sequence[Mapping[str, Any]]) -> tuple[CandidateArrays, np.ndarray, np.ndarray]:
        """``(candidates, per-block ms (N, B), the table's sum (N,))``."""
        d = self.units.decomposition
        candidates = d.encode(configs)
        fixed = self.fixed_latency[candidates.resolution]
        if np.isnan(fixed).any():
            bad = int(np.argwhere(np.isnan(fixed))[0][0])
            raise ValueError(f"candidate {bad}: resolution {configs[bad]['r']} is not in the latency model")
        blocks = d.gather(self.block_latency, candidates)
        units = self._fixed_units + candidates.active.sum(axis=1)
        return candidates, blocks, fixed + blocks.sum(axis=1) - (units - 1) * self.call_overhead

    def evaluate(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Latency (ms) of every candidate: the table's sum, corrected where this model applies a correction."""
        candidates, blocks, total = self._sum(configs)
        if self.correction is None:
            return total
        return self.correction.apply(total, subnet_features(self.units.decomposition, candidates, blocks, total))

    def evaluate_table(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The table's plain sum (ms) of every candidate, whether or not a correction applies."""
        return self._sum(configs)[2]

    def features(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The correction's features (N, F) of every candidate (:func:`~.latency_correction.subnet_features`)."""
        candidates, blocks, total = self._sum(configs)
        return subnet_features(self.units.decomposition, candidates, blocks, total)

    def predict(self, config: Mapping[str, Any]) -> float:
        return float(self.evaluate([config])[0])

    def breakdown(self, config: Mapping[str, Any]) -> list[tuple[str, float]]:
        """``(key, ms)`` of every unit of one subnet, in execution order."""
        return [(u.key, self.table.value(self.precision, u.key, self.stat)) for u in self.units.units(config)]


def table_validation(table: LatencyTable, precision: str) -> dict[str, Any] | None:
    """The validation figures a table records for ``precision`` (see :mod:`.latency_validation`)."""
    validation = table.meta.get("validation") if isinstance(table.meta, dict) else None
    if not isinstance(validation, dict) or not isinstance(validation.get("precisions"), dict):
        return None
    figures = validation["precisions"].get(precision)
    if not isinstance(figures, dict):
        return None
    shared = {k: validation[k] for k in ("subnets", "min_spearman", "max_median_abs_pct_error", "validated")
              if k in validation}
    return {**shared, **figures}


def table_correction(table: LatencyTable, precision: str) -> dict[str, Any] | None:
    """The learned correction a table records for ``precision`` (see
    :func:`~.latency_validation.correct_table`): ``model``, ``held_out``, ``applied``, ... ."""
    correction = table.meta.get("correction") if isinstance(table.meta, dict) else None
    if not isinstance(correction, dict) or not isinstance(correction.get("precisions"), dict):
        return None
    figures = correction["precisions"].get(precision)
    if not isinstance(figures, dict):
        return None
    shared = {k: correction[k] for k in ("fit_subnets", "seed", "stat", "apply", "fitted") if k in correction}
    return {**shared, **figures}
