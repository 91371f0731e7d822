"""Timing primitives of the latency tables, public: time a module (or a chain of modules) at given
input shapes, in fp32 or in int8 on a deployment target's engine and runtime, at a fixed thread
count, under real-time priority if granted. The table profilers of the once-for-all spaces
(:mod:`.latency_profile`) and of ProxylessNAS (:mod:`lightning_nas.tasks.proxyless`), and the
whole-subnet check (:mod:`.latency_validation`), all time through these functions.

* :func:`measure_module`: one module, alone, at an input shape -> :class:`Timing` (median, mean,
  std of the repeats, ms per call). The convenience entry point.
* :func:`runner_for`: the callable that runs a module in a precision on a target (fp32: the module
  itself; int8: converted with :func:`~lightning_nas.deploy.int8.convert_to_int8` on the target's
  quantized engine and weight grid, and on the ONNX Runtime targets exported to ONNX (QDQ) and run
  in a session), optionally stripped of its int8 input/output boundaries.
* :func:`time_callable` (one callable alone) and :func:`time_chain` (callables run back to back as
  one network, a split time per callable and pass).
* :class:`PooledSamples`: pools the split times of every network that held a key and rewrites its
  table entry after each network.

Two facts of CPUs decide how units are timed (measured on this project's 2-core Xeon):

* *cache context*: a block timed alone runs with its weights in L2; inside a network its
  neighbours have evicted them, so the profilers time units inside networks (:func:`time_chain`).
* *time sharing*: on a machine shared with other work, any measurement longer than the scheduler's
  time slice (a few ms) absorbs other processes' slices, even in its median, while short units do
  not. :func:`realtime_priority` times under ``SCHED_FIFO`` (needs root).

fp32 is timed in torch eager mode; int8 on the target's runtime (torch's quantized engine of the
target, or ONNX Runtime). torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_nas.hardware.latency_table import LatencyTable

__all__ = [
    "PooledSamples",
    "Timing",
    "measure_module",
    "onnx_overhead_runner",
    "realtime_priority",
    "runner_for",
    "strip_int8_boundaries",
    "time_callable",
    "time_chain",
]


@dataclass(frozen=True)
class Timing:
    """Statistics of repeated calls, in ms per call (one batch)."""

    count: int
    mean: float
    median: float
    std: float

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            raise ValueError("no samples to summarise")
        return cls(len(samples), statistics.fmean(samples), statistics.median(samples), statistics.pstdev(samples))

    def as_entry(self) -> dict[str, float]:
        """The latency-table entry (``{"count", "mean", "median", "std"}``)."""
        return {"count": self.count, "mean": self.mean, "median": self.median, "std": self.std}


@contextlib.contextmanager
def realtime_priority(enabled: bool = True, priority: int = 10) -> Iterator[bool]:
    """Run the calling thread under ``SCHED_FIFO`` while timing, so that other processes cannot
    preempt it; yields whether that worked (it needs root or CAP_SYS_NICE, and Linux).

    On a machine shared with other work, the scheduler gives every runnable process a time slice of
    a few milliseconds: any measurement longer than that is inflated by the other processes' slices
    (even its median), while short units are not, so a table of units would underestimate whole
    networks. Real-time priority measures what the hardware does. Only the calling thread (and the
    threads it starts meanwhile) is raised, and only for the duration of the block; the kernel's
    real-time throttling still leaves other processes a share of the core.
    """
    if not enabled or not hasattr(os, "sched_setscheduler"):
        yield False
        return
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def time_callable(run: Any, x: Any, *, warmup: int = 10, repeats: int = 50, threads: int | None = 1,
                  realtime: bool = False) -> Timing:
    """Time ``run(x)`` alone: ``warmup`` calls, then ``repeats`` timed ones, at ``threads`` intra-op
    threads (restored afterwards), under real-time priority when ``realtime`` and granted."""
    from lightning_nas.deploy import latency

    with realtime_priority(realtime):
        stats = latency.measure_latency(run, x, warmup=warmup, repeats=repeats, threads=threads)
    return Timing(repeats, stats["mean_ms"], stats["median_ms"], stats["std_ms"])


def time_chain(runners: Sequence[Any], x: Any, *, warmup: int = 10, repeats: int = 50, threads: int | None = 1,
               realtime: bool = False) -> list[list[float]]:
    """Run ``runners`` as one network (each feeds the next) ``warmup + repeats`` times and return
    every runner's split times (ms) of the timed passes.

    :func:`time_callable` times one callable; here one pass must yield a time per unit, so the
    units are timed back to back inside the pass, each with the caches its predecessors left.
    """
    import torch

    from lightning_nas.nn.threads import torch_threads

    times: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter
    with torch_threads(threads), realtime_priority(realtime), torch.inference_mode():
        for step in range(warmup + repeats):
            y = x
            for i, run in enumerate(runners):
                started = clock()
                y = run(y)
                if step >= warmup:
                    times[i].append((clock() - started) * 1000.0)
    return times


def runner_for(module: Any, x: Any, precision: str = "fp32", target: Any = None, *, strip_input: bool = False,
               strip_output: bool = False, threads: int = 1, workdir: str | os.PathLike[str] | None = None,
               ) -> tuple[Any, Any]:
    """``(run, input)``: ``run`` executes ``module`` in ``precision`` on ``target``; ``input`` is
    ``x`` in the form ``run`` takes.

    fp32: the module in eval mode, ``x`` as is. int8: the module converted on ``target``'s quantized
    engine and weight grid (a :class:`~lightning_nas.targets.DeployTarget` or its name; ``None``:
    this host's torch target), with ``x`` as calibration and example input. On a torch target,
    ``strip_input`` / ``strip_output`` remove the quantize at the input / dequantize at the output
    (:func:`strip_int8_boundaries`), so that the module runs int8 -> int8 as it does inside an int8
    network, and ``input`` is then ``x`` quantized. On an ONNX Runtime target the converted module is
    exported to ONNX (QDQ) under ``workdir`` (required) and run in a session of ``threads`` threads
    (float in, float out: ONNX Runtime fuses the QDQ pairs inside one session).
    """
    import torch

    from lightning_nas.deploy.int8 import convert_to_int8, export_onnx, onnx_session
    from lightning_nas.targets import resolve_target

    if precision == "fp32":
        return module.eval(), x
    if precision != "int8":
        raise ValueError(f"precision {precision!r} must be 'fp32' or 'int8'")
    target = resolve_target(target if target is not None else "auto")
    converted = convert_to_int8(module.eval(), [x], example_input=x, target=target)
    if target.runtime == "onnxruntime":
        if workdir is None:
            raise ValueError("an ONNX Runtime target needs a workdir for the exported model")
        path = export_onnx(converted, x, Path(workdir) / f"unit{next(_EXPORTS)}.onnx", dynamic_batch=False)
        session = onnx_session(path, threads=threads)
        name = session.get_inputs()[0].name

        def run(tensor: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: tensor.numpy()})[0])

        return run, x
    if strip_input or strip_output:
        converted, scale, zero_point = strip_int8_boundaries(converted, strip_input, strip_output)
        if strip_input:
            x = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    return converted, x


#: Names the exported files of one process apart (several units share a workdir).
_EXPORTS = itertools.count()


def measure_module(module: Any, input_shape: Sequence[int], *, batch_size: int = 1, precision: str = "fp32",
                   target: Any = None, threads: int = 1, warmup: int = 10, repeats: int = 50,
                   realtime: bool = False, seed: int = 0) -> Timing:
    """Time ``module`` alone on a random input of one sample's ``input_shape`` (``(3, 32, 32)``)
    times ``batch_size``: fp32 in torch eager, int8 on ``target``'s engine and runtime (see
    :func:`runner_for`; float in and out, as a whole network runs). The input is drawn from a
    generator seeded with ``seed``."""
    import torch

    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as workdir:
        run, x = runner_for(module, x, precision, target, threads=threads, workdir=workdir)
        return time_callable(run, x, warmup=warmup, repeats=repeats, threads=threads, realtime=realtime)


class PooledSamples:
    """The split times of the entries measured in one run, pooled over every network that held
    their key (fixed units, blocks sharing a shape); :meth:`add` rewrites the table entries a
    network touched, so an interrupted run keeps every finished network's figures."""

    def __init__(self, table: LatencyTable, output: str | os.PathLike[str]) -> None:
        self.table, self.output = table, Path(output)
        self.samples: dict[tuple[str, str], list[float]] = {}

    def __contains__(self, item: object) -> bool:
        return item in self.samples

    def add(self, precision: str, keys: Sequence[str], times: Sequence[Sequence[float]], wanted: set[str]) -> int:
        """Pool one network's split times (``times[i]`` of the unit keyed ``keys[i]``) of the keys in
        ``wanted`` and record their entries; returns how many of them this run had not met before."""
        new = 0
        for key, samples in zip(keys, times):
            if key in wanted:
                new += (precision, key) not in self.samples
                self.samples.setdefault((precision, key), []).extend(samples)
        for key in dict.fromkeys(k for k in keys if k in wanted):  # unit order
            self.table.record(self.output, precision, key, Timing.from_samples(self.samples[(precision, key)]).as_entry())
        return new


def onnx_overhead_runner(threads: int, workdir: str | os.PathLike[str]) -> Callable[[Any], Any]:
    """An onnxruntime session of a trivial graph: its call time is the per-call overhead."""
    import onnx
    from onnx import TensorProto, helper

    from lightning_nas.deploy.int8 import onnx_session

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = Path(workdir) / "overhead.onnx"
    onnx.save(model, str(path))
    session = onnx_session(path, threads=threads)
    array = np.zeros((1, 8), dtype=np.float32)
    return lambda _: session.run(None, {"x": array})


def strip_int8_boundaries(graph_module: Any, strip_input: bool, strip_output: bool) -> tuple[Any, float, int]:
    """Remove the input ``quantize_per_tensor`` and/or the output ``dequantize`` of a converted
    int8 graph, so that it runs int8 -> int8 as inside a network. Returns the module and the
    input's quantization ``(scale, zero_point)`` (1.0, 0 when the input is kept float)."""
    import torch

    graph = graph_module.graph
    scale, zero_point = 1.0, 0
    if strip_input:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        quantize = [u for u in placeholders[0].users if u.op == "call_function" and u.target is torch.quantize_per_tensor]
        if len(placeholders) != 1 or len(quantize) != 1:
            raise RuntimeError("expected one input feeding one quantize_per_tensor in the converted unit")
        node = quantize[0]
        scale_node, zero_node = node.args[1], node.args[2]
        scale = float(getattr(graph_module, scale_node.target))
        zero_point = int(getattr(graph_module, zero_node.target))
        node.replace_all_uses_with(placeholders[0])
        graph.erase_node(node)
        for attribute in (scale_node, zero_node):
            if not attribute.users:
                graph.erase_node(attribute)
    if strip_output:
        output = next(n for n in graph.nodes if n.op == "output")
        result = output.args[0]
        if not (getattr(result, "op", None) == "call_method" and result.target == "dequantize"):
            raise RuntimeError("expected the converted unit to end with a dequantize")
        output.args = (result.args[0],)
        graph.erase_node(result)
    graph.lint()
    graph_module.recompile()
    return graph_module, scale, zero_point
