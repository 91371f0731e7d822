"""Int8 latency of SpaceEvo sub-stages on the deployment target: one CSV row per sampled sub-stage
of every (stage, block type) cell of a layout (:func:`profile_substages`).

Each cell's :class:`~lightning_nas.nn.spaceevo_blocks.ElasticStage` (random weights: latency does
not depend on them) is set to a sampled sub-stage and extracted to plain layers; the extraction is
converted to int8 on the target's engine and weight grid and, on an ONNX Runtime target, exported
and run in a session, by :func:`~lightning_nas.hardware.profiling.runner_for`, the converter the
once-for-all latency tables use; it is timed alone with
:func:`~lightning_nas.hardware.profiling.time_callable` (warm-up, then the median of repeats).

*Input width.* A sub-stage is timed with a fixed input per stage: the largest width of the previous
stage (the stem's channels for the first stage) at the stage's input size. Only the first block of
a sub-stage sees that width, the tables are keyed without it (SpaceEvo's tables hold one latency
per sub-stage), and the largest input is the one the block-wise distillation feeds every cell
(the elastic stages are built for ``max_in_channels``), so latency and loss rows describe the same
module; the price is an upper bound for subnets whose previous stage runs narrower.

*Int8 boundaries.* Inside an int8 network a stage receives and returns int8 tensors: on a torch
target the quantize at the input and the dequantize at the output are removed (as for the
once-for-all ``expanded_conv`` units). An ONNX Runtime session is float in and float out and costs
a fixed amount per call, paid once per network: that cost is measured once (a trivial graph, as the
``Overhead`` entry of the once-for-all tables) and taken off every row (clamped at 0); it is
recorded in the metadata so that a whole network's estimate adds it back once.

*Sampling.* Per cell, ``samples_per_cell`` sub-stages of
:func:`~lightning_nas.spaces.spaceevo_layout.substage_choices` (all widths, hence every window),
drawn round-robin over the widths from a generator seeded by ``seed`` and the cell, so that every
width (and every window) has rows as soon as there are as many samples as widths; the same seed
gives the same plan.

*Self-validation* (:func:`validate_substage_rows`, run by ``lightning-nas profile`` once the rows
are complete): random whole subnets made of table rows (per stage a row drawn uniformly, in a space
whose window of that stage holds the row's width) are built as standalone networks, converted and
timed whole on the same target; each is predicted as the stem + the sum of its rows + the head at
its last width (both timed alone like the rows, and recorded as ``fixed_ms`` in the metadata) + the
ONNX Runtime call overhead, and Spearman's rank correlation and the median error go into the
metadata (``validation``) with a ``<table>_validation.csv`` of every subnet.

*Crash safety.* The CSV is rewritten (temporary name, then rename) after every row, with a JSON
sidecar ``<output>.meta.json`` (device, target, threads, batch size, protocol, layout). A run
with the same output skips the rows already there; metadata that differ raise
:class:`~lightning_nas.hardware.latency_table.LatencyTableError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_nas.files import replacing, write_json, write_text
from lightning_nas.hardware import profiling
from lightning_nas.hardware.latency_table import LatencyTableError, cpu_name, now
from lightning_nas.hardware.latency_validation import (
    judged,
    spearman,
    summarise,
    time_in_passes,
    validation_csv_path,
)
from lightning_nas.spaces.spaceevo_layout import (
    MacroLayout,
    SpaceChoice,
    StageChoice,
    SubStage,
    space_id,
    stage_windows,
    substage_choices,
)

__all__ = [
    "LATENCY_COLUMNS",
    "KEY_COLUMNS",
    "SubStageProfile",
    "SubStageValidation",
    "cell_input",
    "head_module",
    "profile_substages",
    "read_latency_rows",
    "sample_substages",
    "substage_key",
    "validate_substage_rows",
    "validation_network",
    "validation_subnets",
]

#: The sub-stage key, shared with the loss tables of the block-wise distillation.
KEY_COLUMNS = ("stage", "block_type", "width", "depth", "kernel", "expand")
#: Columns of the latency CSV (``latency_ms``: median, with the ONNX Runtime call cost taken off).
LATENCY_COLUMNS = (*KEY_COLUMNS, "in_channels", "in_size", "latency_ms", "mean_ms", "std_ms")


def substage_key(row: dict[str, Any]) -> tuple[int, str, int, int, int, float]:
    """The key of a row (strings or numbers) as a hashable tuple."""
    return (int(row["stage"]), str(row["block_type"]), int(row["width"]), int(row["depth"]), int(row["kernel"]),
            float(row["expand"]))


def cell_input(layout: MacroLayout, stage: int) -> tuple[int, int]:
    """``(channels, size)`` of the input a stage's sub-stages are timed with (module docstring)."""
    channels = layout.stem.channels if stage == 0 else max(layout.stages[stage - 1].widths)
    return channels, layout.stage_sizes()[stage]


def sample_substages(layout: MacroLayout, stage: int, block_type: str, count: int, seed: int = 0) -> list[SubStage]:
    """``count`` distinct sub-stages of the cell (all of them when it has fewer), round-robin over
    the widths in a seeded random order of each width's sub-stages (module docstring)."""
    rng = random.Random(f"{seed}/{layout.name}/{stage}/{block_type}")
    by_width: dict[int, list[SubStage]] = {}
    for substage in substage_choices(stage, block_type, None, layout):
        by_width.setdefault(substage.width, []).append(substage)
    for choices in by_width.values():
        rng.shuffle(choices)
    widths = sorted(by_width)
    rng.shuffle(widths)
    picked: list[SubStage] = []
    for depth in range(max(len(c) for c in by_width.values())):
        for width in widths:
            if len(picked) < count and depth < len(by_width[width]):
                picked.append(by_width[width][depth])
    return picked


def read_latency_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a latency CSV (strings), checked for the key and latency columns."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in (*KEY_COLUMNS, "latency_ms") if c not in (reader.fieldnames or [])]
        if missing:
            raise LatencyTableError(f"{path} is not a SpaceEvo latency table (it lacks columns {missing})")
        return list(reader)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=LATENCY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


@dataclass
class SubStageProfile:
    path: Path
    measured: int  # rows measured by this run
    skipped: int  # rows already in the file
    remaining: int  # rows still missing (``limit`` stopped the run)
    meta: dict[str, Any]


def _meta(layout: MacroLayout, target: Any, threads: int, batch_size: int, warmup: int, repeats: int,
          realtime: bool, seed: int, samples_per_cell: int) -> dict[str, Any]:
    import dataclasses

    import torch

    meta: dict[str, Any] = {
        "device": cpu_name(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "target": target.name, "torch": torch.__version__, "threads": int(threads), "batch_size": int(batch_size),
        "warmup": int(warmup), "repeats": int(repeats), "realtime": bool(realtime), "seed": int(seed),
        "samples_per_cell": int(samples_per_cell), "input": "largest width of the previous stage",
        "layout": dataclasses.asdict(layout), "unit": "ms",
    }
    if target.runtime == "onnxruntime":
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    else:
        meta["quantized_engine"] = target.engine
    return json.loads(json.dumps(meta))  # the form read back from the sidecar (tuples as lists)


def profile_substages(
    layout: MacroLayout,
    output: str | os.PathLike[str],
    *,
    target: Any,
    samples_per_cell: int = 20,
    stages: Sequence[int] | None = None,
    block_types: Sequence[str] | None = None,
    batch_size: int = 1,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    realtime: bool = False,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> SubStageProfile:
    """Time ``samples_per_cell`` sampled sub-stages of every cell (``stages`` x ``block_types``,
    default all of the layout) in int8 on ``target`` into the CSV ``output`` (module docstring).
    ``limit`` caps the rows measured by this run."""
    import torch

    from lightning_nas.nn.spaceevo_blocks import ElasticStage
    from lightning_nas.nn.threads import torch_threads
    from lightning_nas.targets import resolve_target

    target = resolve_target(target)
    stages = list(range(layout.num_stages)) if stages is None else [int(s) for s in stages]
    block_types = list(layout.block_types) if block_types is None else list(block_types)
    if samples_per_cell < 1 or batch_size < 1 or threads < 1 or repeats < 1 or warmup < 0:
        raise ValueError("samples_per_cell, batch_size, threads and repeats must be >= 1 and warmup >= 0")
    output = Path(output)
    meta_path = output.with_name(output.name + ".meta.json")
    meta = _meta(layout, target, threads, batch_size, warmup, repeats, realtime, seed, samples_per_cell)
    rows: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    if output.exists():
        if not meta_path.exists():
            raise LatencyTableError(f"{output} exists without its metadata {meta_path.name}: not a table of this run")
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
        differing = sorted(k for k in meta if k != "overhead_ms" and previous.get(k) != meta[k])
        if differing:
            raise LatencyTableError(f"{output} was measured with other settings ({', '.join(differing)}): "
                                    "choose another output or the same settings")
        meta["overhead_ms"] = previous.get("overhead_ms")
        rows = [dict(r) for r in read_latency_rows(output)]
    done = {substage_key(r) for r in rows}
    plan = [(stage, block_type, substage) for stage in stages for block_type in block_types
            for substage in sample_substages(layout, stage, block_type, samples_per_cell, seed)]
    todo = [p for p in plan if (p[0], p[1], p[2].width, p[2].depth, p[2].kernel, float(p[2].expand)) not in done]
    skipped = len(plan) - len(todo)
    if not todo:  # the rows are those the last validation measured: its figures still hold
        meta.update({k: previous[k] for k in ("fixed_ms", "validation") if k in previous})
    if limit is not None:
        todo = todo[: max(int(limit), 0)]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    measured = 0
    with torch_threads(threads), tempfile.TemporaryDirectory() as workdir, Progress(
            TextColumn("int8 sub-stages {task.fields[what]}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), disable=not progress) as bar:
        if target.runtime == "onnxruntime" and meta.get("overhead_ms") is None:
            runner = profiling.onnx_overhead_runner(threads, workdir)
            meta["overhead_ms"] = profiling.time_callable(runner, None, warmup=warmup, repeats=repeats,
                                                          threads=threads, realtime=realtime).median
        overhead = float(meta.get("overhead_ms") or 0.0)
        write_json(meta_path, meta)
        if not output.exists():
            _write_rows(output, rows)
        task = bar.add_task("profile", total=len(todo), what="")
        cells: dict[tuple[int, str], Any] = {}
        for stage, block_type, substage in todo:
            bar.update(task, what=f"stage {stage} {block_type} w{substage.width} d{substage.depth} "
                                  f"k{substage.kernel} e{substage.expand}")
            in_channels, in_size = cell_input(layout, stage)
            if (stage, block_type) not in cells:
                cells = {(stage, block_type): ElasticStage(block_type, in_channels, layout.stages[stage].widths,
                                                           layout.stages[stage].stride).eval()}
            elastic = cells[stage, block_type]
            elastic.set_active(substage, in_channels)
            module = elastic.extract().eval()
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(batch_size, in_channels, in_size, in_size, generator=generator)
            run, x = profiling.runner_for(module, x, "int8", target, strip_input=True, strip_output=True,
                                          threads=threads, workdir=workdir)
            timing = profiling.time_callable(run, x, warmup=warmup, repeats=repeats, threads=threads,
                                             realtime=realtime)
            rows.append({"stage": stage, "block_type": block_type, "width": substage.width, "depth": substage.depth,
                         "kernel": substage.kernel, "expand": float(substage.expand), "in_channels": in_channels,
                         "in_size": in_size, "latency_ms": max(timing.median - overhead, 0.0),
                         "mean_ms": max(timing.mean - overhead, 0.0), "std_ms": timing.std})
            _write_rows(output, rows)
            measured += 1
            bar.advance(task)
    return SubStageProfile(output, measured, skipped, len(plan) - skipped - measured, meta)


def head_module(net: Any) -> Any:
    """What follows the last stage of a SpaceEvo network (1x1 conv, pooling, classifier) as one
    module sharing ``net``'s layers, to be timed alone."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.classifier = net.head, net.classifier

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.head(features).mean((2, 3)), 1))

    return Head()


def validation_subnets(layout: MacroLayout, rows: Sequence[dict[str, Any]], count: int,
                       seed: int = 0) -> list[tuple[SpaceChoice, list[dict[str, Any]]]]:
    """``count`` random whole subnets made of ``rows``: per stage a row drawn uniformly from that
    stage's rows (every block type) and a window drawn uniformly from those holding the row's
    width; returns ``(space, rows per stage)``. Raises ``ValueError`` when a stage has no rows."""
    by_stage: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(int(row["stage"]), []).append(row)
    missing = [s for s in range(layout.num_stages) if s not in by_stage]
    if missing:
        raise ValueError(f"no rows for stage(s) {missing}: whole subnets need a row of every stage")
    rng = random.Random(f"{seed}/validation/{layout.name}")
    subnets = []
    for _ in range(count):
        stages, picked = [], []
        for stage in range(layout.num_stages):
            row = by_stage[stage][rng.randrange(len(by_stage[stage]))]
            index = layout.stages[stage].widths.index(int(row["width"]))
            windows = [w for w in stage_windows(stage, layout) if w[0] <= index < w[1]]
            stages.append(StageChoice(str(row["block_type"]), windows[rng.randrange(len(windows))]))
            picked.append(row)
        subnets.append((SpaceChoice(tuple(stages)), picked))
    return subnets


def validation_network(layout: MacroLayout, choice: SpaceChoice, stage_rows: Sequence[dict[str, Any]],
                       batch_size: int = 1, seed: int = 0) -> tuple[Any, Any]:
    """``(network, input)``: the standalone subnet of ``choice`` running ``stage_rows`` (one row
    per stage, as :func:`validation_subnets` gives them), in eval mode, and a seeded input batch."""
    import torch

    from lightning_nas.nn.spaceevo_net import SpaceEvoSubnet
    from lightning_nas.spaces.spaceevo_space import SpaceEvoSubnetSpace

    space = SpaceEvoSubnetSpace(choice, layout)
    config = space.config_of([SubStage(int(r["width"]), int(r["depth"]), int(r["kernel"]), float(r["expand"]))
                              for r in stage_rows])
    x = torch.randn(batch_size, layout.in_channels, layout.resolution, layout.resolution,
                    generator=torch.Generator().manual_seed(seed))
    return SpaceEvoSubnet(space, config).eval(), x


@dataclass
class SubStageValidation:
    """What :func:`validate_substage_rows` measured: ``record`` is what the metadata stores."""

    record: dict[str, Any]
    rows: list[dict[str, Any]]
    csv_path: Path
    #: The stem and the heads by last width, as written into the metadata (``fixed_ms``).
    fixed_ms: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.record["passed"])


def validate_substage_rows(
    layout: MacroLayout,
    output: str | os.PathLike[str],
    *,
    target: Any,
    subnets: int = 30,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 3,
    realtime: bool = False,
    seed: int = 0,
    min_spearman: float | None = None,
    max_median_abs_pct_error: float | None = None,
    report: Any = None,
) -> SubStageValidation:
    """Measure ``subnets`` whole subnets made of the rows of ``output`` and compare them with the
    rows' prediction (module docstring); batch size and threads are the rows' (metadata). Writes
    ``fixed_ms`` and ``validation`` into the metadata and the subnets into
    ``<output>_validation.csv``."""
    import torch

    from lightning_nas.targets import resolve_target

    target = resolve_target(target)
    output = Path(output)
    meta_path = output.with_name(output.name + ".meta.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    batch_size, threads = int(meta["batch_size"]), int(meta["threads"])
    overhead = float(meta.get("overhead_ms") or 0.0)
    rows = read_latency_rows(output)
    picked = validation_subnets(layout, rows, subnets, seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        networks, runners, heads = [], [], {}
        for i, (choice, stage_rows) in enumerate(picked):
            net, x = validation_network(layout, choice, stage_rows, batch_size, seed=i)
            named = {"whole": profiling.runner_for(net, x, "int8", target, threads=threads, workdir=workdir)}
            last_width = int(stage_rows[-1]["width"])
            if i == 0:
                named["stem"] = profiling.runner_for(net.stem, x, "int8", target, strip_output=True,
                                                     threads=threads, workdir=workdir)
            if last_width not in heads:
                with torch.no_grad():
                    features = net.forward_stages(x)[-1]
                named["head"] = profiling.runner_for(head_module(net), features, "int8", target, strip_input=True,
                                                     threads=threads, workdir=workdir)
                heads[last_width] = i
            networks.append((choice, net.config, stage_rows, last_width))
            runners.append(named)
        samples = time_in_passes(runners, threads=threads, warmup=warmup, repeats=repeats, rounds=rounds,
                                 realtime=realtime, report=report)

    def median(timings: Sequence[profiling.Timing]) -> float:
        return statistics.median(t.median for t in timings)

    # a fixed part run alone still pays the ONNX Runtime call, as every row did before it was taken off
    stem_ms = max(median(samples[0]["stem"]) - overhead, 0.0)
    head_ms = {width: max(median(samples[i]["head"]) - overhead, 0.0) for width, i in sorted(heads.items())}
    table_rows = []
    for (choice, config, stage_rows, last_width), timings in zip(networks, samples):
        stages_ms = sum(float(r["latency_ms"]) for r in stage_rows)
        table_rows.append({
            "space": space_id(choice), "config": config, "stages_ms": stages_ms,
            "fixed_ms": stem_ms + head_ms[last_width] + overhead,
            "predicted_ms": stages_ms + stem_ms + head_ms[last_width] + overhead,
            "measured_ms": median(timings["whole"]),
            "measured_passes_ms": [t.median for t in timings["whole"]],
        })
    predicted = [r["predicted_ms"] for r in table_rows]
    measured = [r["measured_ms"] for r in table_rows]
    figures = judged(summarise(predicted, measured), min_spearman, max_median_abs_pct_error)
    # the machine's test-retest ceiling: how well one pass over the subnets ranks them like another
    passes = list(zip(*(r["measured_passes_ms"] for r in table_rows)))
    retest = [spearman(passes[i], passes[j]) for i in range(len(passes)) for j in range(i + 1, len(passes))]
    record = {
        "validated": now(), "subnets": len(table_rows), "seed": int(seed), "target": target.name,
        "warmup": int(warmup), "repeats": int(repeats), "rounds": int(rounds), "realtime": bool(realtime),
        "min_spearman": min_spearman, "max_median_abs_pct_error": max_median_abs_pct_error,
        "seconds": time.perf_counter() - started,
        # the rows alone (no stem, head or call overhead): how much of the ranking they carry
        "spearman_stages_only": judged(summarise([r["stages_ms"] for r in table_rows], measured),
                                       None, None)["spearman"],
        "retest_spearman": statistics.fmean(retest) if retest and all(map(math.isfinite, retest)) else None,
        **figures,
    }
    csv_path = validation_csv_path(output)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subnet", "space", "stages_ms", "fixed_ms", "predicted_ms", "measured_ms", "abs_pct_error",
                     "measured_passes_ms", "config"])
    for i, r in enumerate(table_rows):
        writer.writerow([i, r["space"], f"{r['stages_ms']:.6g}", f"{r['fixed_ms']:.6g}", f"{r['predicted_ms']:.6g}",
                         f"{r['measured_ms']:.6g}",
                         f"{100.0 * abs(r['predicted_ms'] - r['measured_ms']) / r['measured_ms']:.4g}",
                         " ".join(f"{v:.6g}" for v in r["measured_passes_ms"]), json.dumps(r["config"], separators=(",", ":"))])
    write_text(csv_path, buffer.getvalue())
    record["csv"] = csv_path.name
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    fixed_ms = {"stem": stem_ms, "head": {str(w): v for w, v in head_ms.items()}}
    meta["fixed_ms"] = fixed_ms
    meta["validation"] = record
    write_json(meta_path, meta)
    return SubStageValidation(record, table_rows, csv_path, fixed_ms)
