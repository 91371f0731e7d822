"""ProxylessNAS cost tables: the per-(layer, candidate) cost of a ProxylessNAS space in one unit.

* ``latency`` (:func:`measured_latency_table`): this machine's measured latency in ms: every
  candidate op (an MBConv with its shortcut, as it runs in the derived network) and every fixed
  part is a unit of the project's latency table (:mod:`lightning_nas.hardware.latency_table`:
  once-for-all / ProxylessNAS keys from :mod:`lightning_nas.hardware.latency_keys`), timed with
  the public timing API (:mod:`lightning_nas.hardware.profiling`) inside profiling networks
  (median of repeats, fixed threads). Entries are written one by one and reused when the device
  and settings match, so an interrupted measurement resumes and layers of equal shape are timed once.
* ``flops`` (:func:`flops_table`): millions of MACs, from the space's layer specs.
* ``accelerator`` (:func:`accelerator_table`): latency in ms of the BitFusion-like analytic model.

The search task (:mod:`lightning_nas.tasks.proxyless`) builds one of them at setup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..spaces.proxyless import ProxylessSpace, parse_op

__all__ = ["COST_UNITS", "CostTable", "LatencyUnit", "accelerator_table", "flops_table", "latency_units",
           "measured_latency_table"]

COST_UNITS = {"latency": "ms", "flops": "MMACs", "accelerator": "ms (accelerator model)"}


class CostTable:
    """Per-(layer, candidate) costs of a space plus the cost of its fixed layers, in one unit."""

    def __init__(self, kind: str, unit: str, fixed: float, costs: list[list[float]]) -> None:
        self.kind = kind
        self.unit = unit
        self.fixed = float(fixed)
        self.costs = [[float(c) for c in row] for row in costs]

    def arch_cost(self, space: ProxylessSpace, ops: list[str]) -> float:
        """The table's cost of one architecture: fixed + the chosen op of every layer."""
        ops = space.validate(ops)
        return self.fixed + sum(row[layer.candidates.index(op)]
                                for row, layer, op in zip(self.costs, space.layers, ops))

    def scaled(self, factor: float) -> CostTable:
        unit = self.unit if factor == 1.0 else f"{self.unit} x {factor:g}"
        return CostTable(self.kind, unit, self.fixed * factor, [[c * factor for c in row] for row in self.costs])

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "unit": self.unit, "fixed": self.fixed, "costs": self.costs}


def flops_table(space: ProxylessSpace, resolution: int | None = None) -> CostTable:
    """Millions of MACs per candidate (from layer specs)."""
    def mmacs(specs: list) -> float:
        return sum(s.macs for s in specs) / 1e6

    return CostTable("flops", COST_UNITS["flops"], space.fixed_cost(mmacs, resolution),
                     space.candidate_costs(mmacs, resolution))


def accelerator_table(space: ProxylessSpace, resolution: int | None = None, bits: int = 8,
                      arguments: dict[str, Any] | None = None) -> CostTable:
    """Latency (ms) of every candidate on the analytic mixed-precision accelerator."""
    from ..hardware.accelerator import BitFusionModel

    model = BitFusionModel(**(arguments or {}))

    def latency(specs: list) -> float:
        return model.network_cost(specs, {s.name: (bits, bits) for s in specs})[0]

    return CostTable("accelerator", COST_UNITS["accelerator"], space.fixed_cost(latency, resolution),
                     space.candidate_costs(latency, resolution))


@dataclass(frozen=True)
class LatencyUnit:
    """One separately timed piece of a ProxylessNAS network, keyed like the once-for-all /
    ProxylessNAS lookup tables (:mod:`lightning_nas.hardware.latency_table`)."""

    key: str
    make: Callable[[], Any]  # builds the module (or callable) that runs the piece
    shape: tuple[int, ...]  # one sample's input shape


def latency_units(space: ProxylessSpace, resolution: int | None = None
                  ) -> tuple[list[LatencyUnit], list[dict[str, LatencyUnit]]]:
    """(fixed units in execution order, per searchable layer {op: unit}) of ``space``.

    Fixed units: ``Conv`` (stem), the first block (``expanded_conv``), ``Conv_1`` (feature mix),
    ``AvgPool2D``, ``Logits``. Every candidate MBConv is an ``expanded_conv`` unit with its shortcut
    (``idskip``), built as it runs in the derived network; the zero op has no unit (it costs 0).
    Layers of equal shapes share keys, so they are timed once.
    """
    from ..hardware.latency_keys import block_key, layer_key
    from ..nn.proxyless_net import candidate_module, fixed_modules

    resolution = space.resolution if resolution is None else int(resolution)
    stem_out = space.stem_layer_specs(resolution)[0].out_size
    c0, c1, last, feature = space.stem_channels, space.first_block_channels, space.widths[-1], space.feature_channels
    final = space.final_size(resolution)
    fixed = [
        LatencyUnit(layer_key("Conv", resolution, 3, stem_out, c0), lambda: fixed_modules(space)["stem"],
                    (3, resolution, resolution)),
        LatencyUnit(block_key(stem_out, c0, stem_out, c1, c0, 3, 1, c0 == c1, se=False, h_swish=False),
                    lambda: fixed_modules(space)["first_block"], (c0, stem_out, stem_out)),
        LatencyUnit(layer_key("Conv_1", final, last, final, feature), lambda: fixed_modules(space)["feature_mix"],
                    (last, final, final)),
        LatencyUnit(layer_key("AvgPool2D", final, feature, 1, feature), lambda: _GlobalPool(),
                    (feature, final, final)),
        LatencyUnit(f"Logits-input:1x1x{feature}-output:{space.num_classes}",
                    lambda: fixed_modules(space)["classifier"], (feature,)),
    ]
    layers = []
    for i, (layer, size) in enumerate(zip(space.layers, space.input_sizes(resolution))):
        units = {}
        for op in layer.candidates:
            parsed = parse_op(op)
            if parsed is None:
                continue
            kernel, expand = parsed
            out = (size + 2 * (kernel // 2) - kernel) // layer.stride + 1
            key = block_key(size, layer.in_channels, out, layer.out_channels,
                            space.mid_channels(layer.in_channels, expand), kernel, layer.stride, layer.shortcut,
                            se=False, h_swish=False)
            units[op] = LatencyUnit(key, lambda i=i, op=op: candidate_module(space, i, op, shortcut=True),
                                    (layer.in_channels, size, size))
        layers.append(units)
    return fixed, layers


class _GlobalPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


def measured_latency_table(
    space: ProxylessSpace,
    path: str | Path,
    resolution: int | None = None,
    batch_size: int = 1,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 30,
    context: str = "network",
    realtime: bool = False,
) -> CostTable:
    """This machine's latency (ms, median) of every candidate at its layer, from a latency table.

    The table is the project's latency-table file (:class:`~lightning_nas.hardware.latency_table.LatencyTable`,
    precision ``fp32``, once-for-all / ProxylessNAS keys from :func:`latency_units`), so tables are
    shared with the other spaces' tools and any entry already in ``path`` (measured with the same
    device, threads, batch size and torch) is reused: an interrupted measurement resumes, and
    layers or spaces of equal shapes are timed once. ``context="network"`` (default) times the units
    back to back inside *profiling networks* (each network takes, per layer, a candidate not yet
    timed), so caches hold what they hold inside a real network; ``"isolated"`` times each unit
    alone (warm caches, as the original tables were made). ``realtime`` times under real-time
    priority (:func:`~lightning_nas.hardware.profiling.realtime_priority`). The timing is
    :mod:`lightning_nas.hardware.profiling`'s, the networks' plan this space's (:func:`_profiling_chains`).
    """
    from ..hardware import profiling
    from ..hardware.latency_profile import profile_meta
    from ..hardware.latency_table import CONTEXTS, open_table

    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} must be one of {list(CONTEXTS)}")
    path = Path(path)
    resolution = space.resolution if resolution is None else int(resolution)
    fixed, layers = latency_units(space, resolution)
    if realtime:
        with profiling.realtime_priority() as granted:
            realtime = granted
    meta = profile_meta(space, [resolution], batch_size, threads, "torch", warmup, repeats, context, realtime)
    table = open_table(path, meta)
    generator = torch.Generator().manual_seed(0)

    def sample_input(unit: LatencyUnit) -> Tensor:
        return torch.randn(batch_size, *unit.shape, generator=generator)

    timing = {"warmup": warmup, "repeats": repeats, "threads": threads, "realtime": realtime}
    missing = [u for u in fixed + [u for row in layers for u in row.values()] if ("fp32", u.key) not in table]
    if context == "isolated":
        for unit in {u.key: u for u in missing}.values():
            torch.manual_seed(0)
            entry = profiling.time_callable(unit.make().eval(), sample_input(unit), **timing)
            table.record(path, "fp32", unit.key, entry.as_entry())
    elif missing:
        pooled = profiling.PooledSamples(table, path)
        wanted = {u.key for u in missing}
        for chain in _profiling_chains(fixed, layers, wanted):
            torch.manual_seed(0)
            runners = [unit.make().eval() for unit in chain]
            times = profiling.time_chain(runners, sample_input(chain[0]), **timing)
            pooled.add("fp32", [u.key for u in chain], times, wanted)
    table.save(path)

    def value(unit: LatencyUnit) -> float:
        return table.value("fp32", unit.key, "median")

    costs = [[value(row[op]) if op in row else 0.0 for op in layer.candidates]
             for layer, row in zip(space.layers, layers)]
    return CostTable("latency", COST_UNITS["latency"], sum(value(u) for u in fixed), costs)


def _profiling_chains(fixed: list[LatencyUnit], layers: list[dict[str, LatencyUnit]],
                      wanted: set[str]) -> Iterator[list[LatencyUnit]]:
    """The profiling networks of the wanted units: network ``n`` runs, per layer, the ``n``-th
    candidate whose key is still wanted (the first candidate once none is), until every key is covered."""
    uncovered = set(wanted)
    while uncovered:
        chain = [fixed[0], fixed[1]]
        for row in layers:
            fresh = [u for u in row.values() if u.key in uncovered and u.key not in {c.key for c in chain}]
            chain.append(fresh[0] if fresh else next(iter(row.values())))
        chain += fixed[2:]
        uncovered -= {u.key for u in chain}
        yield chain


