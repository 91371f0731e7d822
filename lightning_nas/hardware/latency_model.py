"""The table latency model: a subnet's latency is the sum of its units' latencies in a table.

Tabulated per ``(resolution, block, kernel, expand)`` so a batch of candidates costs a few array
gathers. A runtime that runs a whole network in one call (ONNX Runtime) pays its call overhead
once per network but once per unit in the table: the table's ``Overhead`` entry is taken off for
every unit but one. How well the sum predicts whole subnets on a machine is measured by
:mod:`.latency_validation` and recorded in the table (``meta["validation"]``); the model exposes
it as :attr:`TableLatencyModel.validation`.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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
    """

    def __init__(self, space: ElasticSpace, table: LatencyTable | str | os.PathLike[str], precision: str = "fp32",
                 stat: str = "median", resolutions: Sequence[int] | None = None,
                 units: UnitDecomposition | None = None) -> None:
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

    @property
    def validation(self) -> dict[str, Any] | None:
        """The table's whole-subnet check for this model's precision (``spearman``,
        ``median_abs_pct_error``, ``subnets``, ``passed``, ...), None when the table was not validated."""
        return table_validation(self.table, self.precision)

    def evaluate(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Latency (ms) of every candidate."""
        d = self.units.decomposition
        candidates = d.encode(configs)
        fixed = self.fixed_latency[candidates.resolution]
        if np.isnan(fixed).any():
            bad = int(np.argwhere(np.isnan(fixed))[0][0])
            raise ValueError(f"candidate {bad}: resolution {configs[bad]['r']} is not in the latency model")
        blocks = d.gather(self.block_latency, candidates).sum(axis=1)
        units = self._fixed_units + candidates.active.sum(axis=1)
        return fixed + blocks - (units - 1) * self.call_overhead

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
