"""The profiler of once-for-all MobileNetV3 spaces: measure every distinct unit of a space into a
latency table (:func:`profile_space`).

:func:`profile_space` enumerates every distinct unit (:mod:`.latency_keys`) of a space over a set
of resolutions and times it in fp32 and/or int8 (warm-up, then the median of repeats) with the
primitives of :mod:`.profiling`. Units are built alone from the plain layers of an extracted subnet
(:mod:`lightning_nas.nn.static`); int8 units are converted one by one on the deployment target's
quantized engine and weight grid (:func:`~.profiling.runner_for`), so the table times the kernels
the deployed network runs. Inside an int8 network a block receives and returns int8 tensors, so the
quantize at a unit's input and the dequantize at its output are removed from the converted graph
wherever the whole network would not run them. On an ONNX Runtime target each converted unit is
exported to ONNX (QDQ) and run in its own session; a session call's fixed cost, paid once per
network but once per unit in the table, is measured as the ``Overhead`` entry and taken off by the
model.

*Cache context*: timed alone (``context="isolated"``, how the once-for-all tables were made) the
sum of the units underestimated whole networks by about a third on this project's 2-core Xeon, so
by default (``context="network"``) units are timed back to back inside *profiling networks* that
mix blocks of every size, the way sampled subnets do (:func:`profiling_configs`), each unit timed
within the pass. ``realtime=True`` times under ``SCHED_FIFO`` (:func:`~.profiling.realtime_priority`).
"""

from __future__ import annotations

import functools
import os
import platform
import random
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_nas.hardware import profiling
from lightning_nas.hardware.latency_keys import Unit, UnitDecomposition
from lightning_nas.hardware.latency_table import (
    CONTEXTS,
    INT8_BACKENDS,
    OVERHEAD_KEY,
    PRECISIONS,
    LatencyTable,
    cpu_name,
    open_table,
)
from lightning_nas.progress import progress_bar
from lightning_nas.spaces.protocol import ElasticSpace

__all__ = ["ProfileResult", "profile_meta", "profile_space", "profiling_configs"]

#: Per unit kind: does the whole int8 network feed it an int8 tensor / consume its output as int8?
#: (The global pooling runs in float inside the int8 network, see ``convert_to_int8``.)
_INT8_BOUNDARIES: dict[str, tuple[bool, bool]] = {
    "Conv": (False, True),
    "expanded_conv": (True, True),
    "Conv_1": (True, False),
    "Conv_2": (False, True),
    "Logits": (True, False),
}


@dataclass
class ProfileResult:
    path: Path
    measured: int  # entries measured in this run
    skipped: int  # entries that were already in the table
    remaining: int  # entries still missing (``limit`` stopped the run early)


@dataclass
class _Network:
    """A profiling network: a subnet config, its index in the plan and its units."""

    config: dict
    index: int
    units: list[Unit]

    @property
    def resolution(self) -> int:
        return int(self.config["r"])


def profiling_configs(space: ElasticSpace, units: UnitDecomposition, resolution: int, seed: int = 0) -> list[dict]:
    """Random subnets at ``resolution`` steered to hold every block choice of the space.

    Each network draws every stage's depth at random and every running block's (kernel, expand)
    among the choices whose key no earlier network holds (any choice once all are held), so the
    networks look like the subnets a search samples (what a block costs depends on how much cache
    its neighbours leave it: a small int8 subnet stays in L2, a deep one does not) while together
    they cover every key. A stage runs deeper when a key exists only at a deeper position. The plan
    depends only on the space, the resolution and ``seed``, so a resumed run follows it again.
    """
    d = units.decomposition
    ri = d.resolutions.index(resolution)
    rng = random.Random(f"profiling-networks-{seed}-{resolution}")
    pairs = [(ki, ei) for ki in range(len(d.kernels)) for ei in range(len(d.expands))]

    def key(b: int, pair: tuple[int, int]) -> str:
        return units.blocks[ri][b][pair[0]][pair[1]].key

    uncovered = {key(b, pair) for b in range(d.num_blocks) for pair in pairs}
    depths = sorted(space.depth_choices)
    # per stage and position: keys found at no shallower position of the stage
    deep_only = []
    for s in range(d.num_stages):
        blocks, seen, stage = list(space.stage_blocks(s)), set(), []
        for b in blocks:
            keys = {key(b, pair) for pair in pairs}
            stage.append(keys - seen)
            seen |= keys
        deep_only.append(stage)
    configs = []
    while uncovered:
        config = {"ks": [d.kernels[0]] * d.num_blocks, "e": [d.expands[0]] * d.num_blocks, "d": [], "r": resolution}
        for s in range(d.num_stages):
            depth = rng.choice(depths)
            needed = [p + 1 for p, keys in enumerate(deep_only[s]) if keys & uncovered]
            config["d"].append(max([depth] + [min(x for x in depths if x >= n) for n in needed]))
            for b in list(space.stage_blocks(s))[: config["d"][-1]]:
                fresh = [pair for pair in pairs if key(b, pair) in uncovered]
                ki, ei = rng.choice(fresh or pairs)
                config["ks"][b], config["e"][b] = d.kernels[ki], d.expands[ei]
                uncovered.discard(key(b, (ki, ei)))
        configs.append(space.canonical(config))
    return configs


def profile_space(
    space: ElasticSpace,
    output: str | os.PathLike[str],
    resolutions: Sequence[int] | None = None,
    batch_size: int = 1,
    threads: int = 1,
    precisions: Sequence[str] = ("fp32", "int8"),
    int8_backend: str = "torch",
    warmup: int = 10,
    repeats: int = 50,
    context: str = "network",
    realtime: bool = False,
    rounds: int = 1,
    limit: int | None = None,
    progress: bool = True,
    seed: int = 0,
    target: Any = None,
) -> ProfileResult:
    """Measure every distinct unit of ``space`` and write the table to ``output``.

    ``context="network"`` (default) times the units inside profiling networks: per resolution, a
    few random subnets that together hold every block choice (:func:`profiling_configs`) are cut
    into their units, each built alone (fp32 modules, or int8 units converted one by one), and the
    units run as a chain, each timed within the pass. Caches then hold what they hold inside a real
    network: on a CPU whose L2 holds a block's weights but not a network's, a block timed alone is
    markedly faster than the same block inside a network. A key met several times in a run (fixed
    units, blocks sharing a shape) pools its samples.
    ``context="isolated"`` times every unit alone (warm caches), as the once-for-all tables were
    measured.

    Entries already in ``output`` (same device, threads, batch size, torch, backend) are kept and
    skipped. ``limit`` caps the work of this run: profiling networks (network context) or
    entries (isolated context). ``realtime`` times under real-time priority (see
    :func:`~.profiling.realtime_priority`); the table records whether it was granted. ``rounds > 1`` (network
    context) times every profiling network again in later passes over all of them, pooling the
    samples, so that each entry averages over the machine's state during the whole run (shared
    machines drift by tens of percent within minutes); it keeps every profiling network in memory.
    ``target`` (a deployment target or its name, :mod:`lightning_nas.targets`; default: this
    host's for ``int8_backend``, whose runtime it must have) decides the quantized engine and weight
    grid of the int8 units and is recorded in the table's metadata, which searches check it against.
    """
    from lightning_nas.nn.threads import torch_threads
    from lightning_nas.targets import resolve_target

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precisions {list(precisions)} must be a non-empty subset of {list(PRECISIONS)}")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(f"int8_backend {int8_backend!r} must be one of {list(INT8_BACKENDS)}")
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} must be one of {list(CONTEXTS)}")
    if batch_size < 1 or threads < 1 or repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError("batch_size, threads, repeats and rounds must be >= 1 and warmup >= 0")
    deploy_target = resolve_target(target if target is not None else f"auto/{int8_backend}")
    if deploy_target.runtime != int8_backend:
        raise ValueError(f"int8_backend {int8_backend!r} is not the runtime of target {deploy_target.name}")
    output = Path(output)
    resolutions = list(space.resolutions) if resolutions is None else [int(r) for r in resolutions]
    decomposition = UnitDecomposition(space)
    units = decomposition.all_units(resolutions)
    if realtime:
        with profiling.realtime_priority() as granted:
            realtime = granted
        if not realtime:
            warnings.warn("real-time priority was not granted (needs root or CAP_SYS_NICE); timing at normal "
                          "priority", RuntimeWarning, stacklevel=2)
    meta = profile_meta(space, resolutions, batch_size, threads, int8_backend, warmup, repeats, context, realtime,
                        rounds, target=deploy_target, precisions=precisions)
    table = open_table(output, meta)
    overhead = "int8" in precisions and int8_backend == "onnxruntime"
    total = len(units) * len(precisions) + int(overhead)
    missing = [(p, u.key) for u in units for p in precisions if (p, u.key) not in table]
    skipped = total - len(missing) - int(overhead and ("int8", OVERHEAD_KEY) not in table)
    table.merge_save(output)

    measured = 0
    timing = _Timing(deploy_target, threads, warmup, repeats, realtime)
    with torch_threads(threads), tempfile.TemporaryDirectory() as workdir:
        workdir_path = Path(workdir)
        if overhead and ("int8", OVERHEAD_KEY) not in table:
            runner = profiling.onnx_overhead_runner(threads, workdir_path)
            entry = profiling.time_callable(runner, None, warmup=warmup, repeats=repeats, threads=threads,
                                            realtime=realtime)
            table.add("int8", OVERHEAD_KEY, entry.as_entry())
            table.merge_save(output)
            measured += 1
        if context == "network":
            measured += _profile_networks(space, decomposition, table, output, resolutions, precisions, batch_size,
                                          timing, limit, progress, seed, workdir_path, rounds)
        else:
            measured += _profile_isolated(space, units, table, output, precisions, batch_size, timing, limit,
                                          progress, seed, workdir_path)
    remaining = sum(1 for u in units for p in precisions if (p, u.key) not in table)
    return ProfileResult(output, measured, skipped, remaining)


@dataclass(frozen=True)
class _Timing:
    """How every entry of one run is timed."""

    target: Any  # DeployTarget: engine, weight grid and runtime of the int8 units
    threads: int
    warmup: int
    repeats: int
    realtime: bool

    def int8_runner(self, module: Any, unit: Unit, x: Any, workdir: Path) -> tuple[Any, Any]:
        """``(run, input)`` of ``unit`` as it runs inside an int8 network (see :func:`profiling.runner_for`)."""
        if unit.kind == "AvgPool2D":  # float inside the int8 network (between a dequantize and a quantize)
            return module.eval(), x
        strip_input, strip_output = _INT8_BOUNDARIES[unit.kind]
        return profiling.runner_for(module, x, "int8", self.target, strip_input=strip_input,
                                    strip_output=strip_output, threads=self.threads, workdir=workdir)


def _profile_networks(space: ElasticSpace, decomposition: UnitDecomposition, table: LatencyTable, output: Path,
                      resolutions: Sequence[int], precisions: Sequence[str], batch_size: int, timing: _Timing,
                      limit: int | None, progress: bool, seed: int, workdir: Path, rounds: int) -> int:
    import torch

    networks = []
    for r in resolutions:
        for index, config in enumerate(profiling_configs(space, decomposition, r, seed)):
            network = _Network(config, index, decomposition.units(config))
            if any((p, u.key) not in table for u in network.units for p in precisions):
                networks.append(network)
    if limit is not None:
        networks = networks[: max(int(limit), 0)]
    measured = 0
    pooled = profiling.PooledSamples(table, output)  # samples of the keys recorded in this run

    def prepare() -> Iterator[tuple[_Network, str, list[Any], Any, set[str]]]:
        """Build every network's units once per precision (int8 conversion is the slow part)."""
        from lightning_nas.nn.builders import build_subnet

        for network in networks:
            subnet = build_subnet(space, network.config).eval()
            modules = [_unit_module(subnet, unit).eval() for unit in network.units]
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(batch_size, 3, network.resolution, network.resolution, generator=generator)
            # every unit's float input, to calibrate its int8 conversion
            inputs = []
            with torch.inference_mode():
                y = x
                for module in modules:
                    inputs.append(y)
                    y = module(y)
            for precision in precisions:
                wanted = {u.key for u in network.units
                          if (precision, u.key) not in table or (precision, u.key) in pooled}
                if precision == "fp32" or not wanted:
                    runners = modules
                else:
                    runners = [timing.int8_runner(m, u, i.clone(), workdir)[0]
                               for m, u, i in zip(modules, network.units, inputs)]
                yield network, precision, runners, x, wanted

    kept: list[tuple[_Network, str, list[Any], Any, set[str]]] = []
    with progress_bar("profiling {task.fields[what]}", progress, elapsed=False) as bar:
        task = bar.add_task("profile", total=len(networks) * len(precisions) * rounds, what="")
        for round_index in range(rounds):
            for item in prepare() if round_index == 0 else kept:
                if round_index == 0 and rounds > 1:
                    kept.append(item)
                network, precision, runners, x, wanted = item
                bar.update(task, what=f"{precision} r={network.resolution} network {network.index} "
                                      f"round {round_index + 1}/{rounds}")
                if wanted:
                    times = profiling.time_chain(runners, x, warmup=timing.warmup, repeats=timing.repeats,
                                                 threads=timing.threads, realtime=timing.realtime)
                    measured += pooled.add(precision, [u.key for u in network.units], times, wanted)
                bar.advance(task)
    return measured


def _profile_isolated(space: ElasticSpace, units: Sequence[Unit], table: LatencyTable, output: Path,
                      precisions: Sequence[str], batch_size: int, timing: _Timing, limit: int | None,
                      progress: bool, seed: int, workdir: Path) -> int:
    import torch

    # every precision of a unit in a row, so that a limited (smoke) run still covers all precisions
    todo = [(u, p) for u in units for p in precisions if (p, u.key) not in table]
    if limit is not None:
        todo = todo[: max(int(limit), 0)]
    subnet, choice = None, None
    measured = 0
    with progress_bar("profiling {task.fields[what]}", progress, elapsed=False) as bar:
        task = bar.add_task("profile", total=len(todo), what="")
        for unit, precision in todo:
            bar.update(task, what=f"{precision} {unit.key[:60]}")
            if (precision, unit.key) in table:  # another process sharing the file measured it meanwhile
                bar.advance(task)
                continue
            wanted = (unit.kernel, unit.expand) if unit.kernel is not None else choice or (None, None)
            if subnet is None or wanted != choice:
                subnet, choice = _subnet_for(space, *wanted), wanted
            module = _unit_module(subnet, unit).eval()
            generator = torch.Generator().manual_seed(seed)
            shape = (batch_size, unit.in_channels) + (() if unit.flat_input else (unit.in_size, unit.in_size))
            x = torch.randn(*shape, generator=generator)
            run = module
            if precision == "int8":
                run, x = timing.int8_runner(module, unit, x, workdir)
            entry = profiling.time_callable(run, x, warmup=timing.warmup, repeats=timing.repeats,
                                            threads=timing.threads, realtime=timing.realtime)
            table.record(output, precision, unit.key, entry.as_entry())
            measured += 1
            bar.advance(task)
    return measured


def _subnet_for(space: ElasticSpace, kernel: int | None, expand: int | None) -> Any:
    """A subnet running every block with ``kernel`` and ``expand`` (all blocks, random weights)."""
    from lightning_nas.nn.builders import build_subnet

    kernel = min(space.kernel_choices) if kernel is None else kernel
    expand = min(space.expand_choices) if expand is None else expand
    config = {"ks": [kernel] * space.num_blocks, "e": [expand] * space.num_blocks,
              "d": [space.max_depth] * space.num_stages, "r": space.resolutions[0]}
    return build_subnet(space, config).eval()

def _unit_module(subnet: Any, unit: Unit) -> Any:
    """The module that runs ``unit`` alone, taken from an extracted subnet (shared weights)."""
    from lightning_nas.deploy.int8 import FloatAvgPool

    if unit.module == "pool":
        # the head's pooling as lightning_nas.nn.static.Head runs it: x.mean((2, 3), keepdim=True)
        return FloatAvgPool("mean", ((2, 3),), {"keepdim": True})
    if unit.module == "head.feature_mix":
        return _flattened_class()(subnet.get_submodule(unit.module))
    return subnet.get_submodule(unit.module)


@functools.cache
def _flattened_class() -> type:
    """A module running a layer then ``torch.flatten(., 1)``, as the head does after its feature mix.

    ``torch.flatten`` (unlike ``nn.Flatten``) stays on the int8 tensor in a converted graph, as it
    does in the whole network. Defined on first use so that this module does not import torch.
    """
    import torch
    from torch import nn

    class Flattened(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.layer(x), 1)

    return Flattened


def profile_meta(space: ElasticSpace, resolutions: Sequence[int], batch_size: int, threads: int, int8_backend: str,
                 warmup: int, repeats: int, context: str = "network", realtime: bool = False,
                 rounds: int = 1, target: Any = None, precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    """The metadata written into (and checked when resuming) a profiled table.

    ``target`` (a :class:`~lightning_nas.targets.DeployTarget`; None: none recorded) is the
    deployment target whose engine times the int8 units; the torch engine is recorded when int8
    units are timed in torch (an fp32 table depends on neither).
    """
    import torch

    meta: dict[str, Any] = {
        "device": cpu_name(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": int(threads),
        "batch_size": int(batch_size),
        "torch": torch.__version__,
        "int8_backend": int8_backend,
        "context": context,
        "realtime": bool(realtime),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "rounds": int(rounds),
        "space": {"name": space.name, **space.hparams()},
        "resolutions": [int(r) for r in resolutions],
        "unit": "ms",
    }
    if target is not None:
        meta["target"] = target.name
    if int8_backend == "onnxruntime":
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    elif "int8" in precisions and target is not None:
        meta["quantized_engine"] = target.engine
    return meta


