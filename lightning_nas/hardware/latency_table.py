"""Measured latency lookup tables: keys, file format, the table latency model and the profiler.

**Keys.** A network of a once-for-all MobileNetV3 space is cut into *units*: the stem, the fixed
first block, every running elastic block, and the head (final expand conv, global pooling,
feature-mix conv, classifier). Units are keyed the way the once-for-all tables key them, so that
tables measured here and the OFA YAML tables users already have are interchangeable::

    Conv-input:224x224x3-output:112x112x16                 stem
    expanded_conv-input:112x112x16-output:56x56x24-expand:64-kernel:3-stride:2-idskip:0-se:0-hs:0
    Conv_1-input:7x7x160-output:7x7x960                    final expand conv
    AvgPool2D-input:7x7x960-output:1x1x960                 global pooling
    Conv_2-input:1x1x960-output:1x1x1280                   feature-mix conv
    Logits-input:1x1x1280-output:1000                      classifier

(``expand`` is the block's hidden channel count, ``idskip`` the identity shortcut, ``se``
squeeze-excite, ``hs`` h-swish.) The first block is an ``expanded_conv`` whose hidden width
equals its input width.

**Table file** (JSON)::

    {"format": "lightning-nas/latency-table", "version": 1,
     "meta": {"device": <cpu name>, "machine", "cpu_count", "threads", "batch_size", "torch",
              "int8_backend", "context", "realtime", "warmup", "repeats", "rounds", "space",
              "resolutions", "unit": "ms", ...},
     "entries": {"fp32": {<key>: {"count", "mean", "median", "std"}}, "int8": {...}}}

Every value is milliseconds per forward call of one batch. OFA YAML tables (``<key>: {count, mean,
std}``) are read into the same structure, under a precision of the caller's choice.

**Latency model.** A subnet's latency is the sum of its units' latencies (:class:`TableLatencyModel`),
tabulated per ``(resolution, block, kernel, expand)`` so a batch of candidates costs a few array
gathers.

**Profiler.** :func:`profile_space` enumerates every distinct unit of a space over a set of
resolutions and times it in fp32 and/or int8 (warm-up, then the median of repeats). Units are
built alone from the plain layers of an extracted subnet (:mod:`lightning_nas.nn.static`); int8
units are converted one by one with :func:`lightning_nas.deploy.int8.convert_to_int8` (torch.ao x86
kernels). Inside an int8 network a block receives and returns int8 tensors, so the quantize at a
unit's input and the dequantize at its output are removed from the converted graph wherever the
whole network would not run them. With the ``onnxruntime`` backend each converted unit is exported
to ONNX (QDQ) and run in its own session; a session call's fixed cost, paid once per network but
once per unit in the table, is measured as the ``Overhead`` entry and taken off by the model.

Two facts of CPUs decide how units are timed (measured on this project's 2-core Xeon):

* *cache context*: a block timed alone runs with its weights in L2; inside a network its
  neighbours have evicted them. Timed alone (``context="isolated"``, how the once-for-all tables
  were made) the sum of the units underestimated whole networks by about a third, so by default
  (``context="network"``) units are timed back to back inside *profiling networks* that mix
  blocks of every size, the way sampled subnets do, each unit timed within the pass.
* *time sharing*: on a machine shared with other work, any measurement longer than the scheduler's
  time slice (a few ms) absorbs other processes' slices, even in its median, while short units do
  not. ``realtime=True`` times under ``SCHED_FIFO`` (:func:`realtime_priority`, needs root).

Each finished entry is written to the table file (an atomic rewrite, merged under a lock with the
entries other processes wrote meanwhile: two profilers may share one table), so an interrupted run
resumes where it stopped; resuming checks that device, threads, batch size, torch version, int8
backend, context and priority are those of the table.

Reading tables and the latency model do not import torch; profiling does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lightning_nas.files import locked, write_text
from lightning_nas.hardware.counts import BlockDecomposition
from lightning_nas.spaces.layers import LayerSpec

__all__ = [
    "PRECISIONS",
    "TABLE_FORMAT",
    "LatencyTable",
    "TableLatencyModel",
    "Unit",
    "UnitDecomposition",
    "block_key",
    "cpu_name",
    "profile_space",
    "space_units",
]

TABLE_FORMAT = "lightning-nas/latency-table"
TABLE_VERSION = 1
PRECISIONS = ("fp32", "int8")
INT8_BACKENDS = ("torch", "onnxruntime")
#: Where units are timed: inside a chain of units forming a network, or each alone.
CONTEXTS = ("network", "isolated")
#: Key of the per-call overhead of a runtime that runs a whole network in one call (onnxruntime).
OVERHEAD_KEY = "Overhead"
#: Metadata that must agree before a run may add entries to an existing table.
_RESUME_META = ("device", "machine", "threads", "batch_size", "torch", "int8_backend", "context", "realtime")


class LatencyTableError(ValueError):
    """A latency table file that cannot be used as it is (the message names the file): the
    stages turn it into a recipe error naming the key that gave the file."""


def _shape(*dims: int) -> str:
    return "x".join(str(int(d)) for d in dims)


def block_key(in_size: int, in_channels: int, out_size: int, out_channels: int, mid_channels: int,
              kernel: int, stride: int, idskip: bool, se: bool, h_swish: bool) -> str:
    """The once-for-all key of an MBConv block (``expanded_conv-...``)."""
    return (f"expanded_conv-input:{_shape(in_size, in_size, in_channels)}"
            f"-output:{_shape(out_size, out_size, out_channels)}-expand:{int(mid_channels)}"
            f"-kernel:{int(kernel)}-stride:{int(stride)}-idskip:{int(bool(idskip))}"
            f"-se:{int(bool(se))}-hs:{int(bool(h_swish))}")


def _layer_key(kind: str, in_size: int, in_channels: int, out_size: int, out_channels: int) -> str:
    return f"{kind}-input:{_shape(in_size, in_size, in_channels)}-output:{_shape(out_size, out_size, out_channels)}"


@dataclass(frozen=True)
class Unit:
    """One separately timed piece of a network.

    ``module`` is the path of the piece in an extracted subnet (``stem``, ``first_block``,
    ``blocks.<b>``, ``head.final_expand``, ``pool``, ``head.feature_mix``, ``classifier``);
    ``kernel`` / ``expand`` are the choices of the subnet that holds it (elastic blocks only).
    """

    key: str
    kind: str  # Conv, expanded_conv, Conv_1, AvgPool2D, Conv_2, Logits
    module: str
    in_channels: int
    in_size: int
    kernel: int | None = None
    expand: int | None = None

    @property
    def flat_input(self) -> bool:
        return self.kind == "Logits"


def _by_name(specs: Sequence[LayerSpec], name: str) -> LayerSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ValueError(f"the space has no layer '{name}' (expected the OFA MobileNetV3 naming contract)")


def _fixed_units(specs: Sequence[LayerSpec]) -> list[Unit]:
    """Units of the fixed layers of an OFA MobileNetV3 network (see the module docstring)."""
    stem = _by_name(specs, "stem.conv")
    dw = _by_name(specs, "first_block.dw.conv")
    project = _by_name(specs, "first_block.project.conv")
    final = _by_name(specs, "head.final_expand.conv")
    mix = _by_name(specs, "head.feature_mix.conv")
    classifier = _by_name(specs, "classifier.linear")
    # the first block: expand ratio 1, 3x3, ReLU, no squeeze-excite (see the space's layout)
    first_residual = dw.stride == 1 and dw.in_channels == project.out_channels
    return [
        Unit(_layer_key("Conv", stem.in_size, stem.in_channels, stem.out_size, stem.out_channels), "Conv",
             "stem", stem.in_channels, stem.in_size),
        Unit(block_key(dw.in_size, dw.in_channels, project.out_size, project.out_channels, dw.out_channels,
                       dw.kernel_size, dw.stride, first_residual, se=False, h_swish=False),
             "expanded_conv", "first_block", dw.in_channels, dw.in_size),
        Unit(_layer_key("Conv_1", final.in_size, final.in_channels, final.out_size, final.out_channels), "Conv_1",
             "head.final_expand", final.in_channels, final.in_size),
        Unit(_layer_key("AvgPool2D", final.out_size, final.out_channels, 1, final.out_channels), "AvgPool2D",
             "pool", final.out_channels, final.out_size),
        Unit(_layer_key("Conv_2", mix.in_size, mix.in_channels, mix.out_size, mix.out_channels), "Conv_2",
             "head.feature_mix", mix.in_channels, mix.in_size),
        Unit(f"Logits-input:{_shape(1, 1, classifier.in_channels)}-output:{classifier.out_channels}", "Logits",
             "classifier", classifier.in_channels, 1),
    ]


def _block_unit(space: Any, block: int, specs: Sequence[LayerSpec], kernel: int, expand: int) -> Unit:
    by_role = {spec.role: spec for spec in specs}
    try:
        expand_conv, dw, project = by_role["pw_expand"], by_role["dw"], by_role["pw_project"]
    except KeyError as missing:
        raise ValueError(f"block {block} has no {missing} layer; expected an MBConv block") from None
    info = space.blocks[block]
    key = block_key(expand_conv.in_size, expand_conv.in_channels, project.out_size, project.out_channels,
                    dw.out_channels, dw.kernel_size, dw.stride, info.residual, "se_reduce" in by_role,
                    info.activation == "h_swish")
    return Unit(key, "expanded_conv", f"blocks.{block}", expand_conv.in_channels, expand_conv.in_size,
                kernel, expand)


class UnitDecomposition:
    """The units of every candidate of an OFA MobileNetV3 space, tabulated like
    :class:`~lightning_nas.hardware.counts.BlockDecomposition`: ``fixed[ri]`` and
    ``blocks[ri][b][ki][ei]``."""

    def __init__(self, space: Any, decomposition: BlockDecomposition | None = None) -> None:
        self.space = space
        self.decomposition = d = decomposition or BlockDecomposition(space)
        self.fixed: list[list[Unit]] = [_fixed_units(specs) for specs in d.fixed]
        self.blocks: list[list[list[list[Unit]]]] = [
            [[[_block_unit(space, b, d.block_layers[ri][b][ki][ei], k, e) for ei, e in enumerate(d.expands)]
              for ki, k in enumerate(d.kernels)] for b in range(d.num_blocks)]
            for ri in range(len(d.resolutions))
        ]

    def units(self, config: Mapping[str, Any]) -> list[Unit]:
        """The units of one subnet, in execution order."""
        d = self.decomposition
        ri = d.resolutions.index(config["r"])
        fixed = self.fixed[ri]
        blocks = [self.blocks[ri][b][d.kernels.index(config["ks"][b])][d.expands.index(config["e"][b])]
                  for b in self.space.active_blocks(config)]
        return [fixed[0], fixed[1], *blocks, *fixed[2:]]

    def all_units(self, resolutions: Sequence[int] | None = None) -> list[Unit]:
        """Every distinct unit the space can produce at ``resolutions`` (default: all of the space's),
        in an order that keeps units of the same (kernel, expand) subnet together."""
        d = self.decomposition
        wanted = d.resolutions if resolutions is None else list(resolutions)
        unknown = [r for r in wanted if r not in d.resolutions]
        if unknown:
            raise ValueError(f"resolutions {unknown} are not in the space's resolutions {d.resolutions}")
        seen: dict[str, Unit] = {}
        indices = [d.resolutions.index(r) for r in wanted]
        for ri in indices:
            for unit in self.fixed[ri]:
                seen.setdefault(unit.key, unit)
        for ki in range(len(d.kernels)):
            for ei in range(len(d.expands)):
                for ri in indices:
                    for b in range(d.num_blocks):
                        unit = self.blocks[ri][b][ki][ei]
                        seen.setdefault(unit.key, unit)
        return list(seen.values())


def space_units(space: Any, resolutions: Sequence[int] | None = None) -> list[Unit]:
    """Every distinct unit (table key) of ``space`` at ``resolutions``."""
    return UnitDecomposition(space).all_units(resolutions)


# --------------------------------------------------------------------------- table file


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class LatencyTable:
    """Latency entries by precision and key, with the metadata of the measurement."""

    def __init__(self, meta: Mapping[str, Any] | None = None,
                 entries: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self.entries: dict[str, dict[str, dict[str, Any]]] = {
            precision: {key: dict(value) for key, value in table.items()} for precision, table in (entries or {}).items()
        }

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | os.PathLike[str], precision: str = "fp32") -> LatencyTable:
        """A table file: this package's JSON, or an OFA YAML table (read as ``precision``)."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            return cls.from_ofa_yaml([path], precision=precision)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LatencyTableError(f"{path}: not a JSON latency table ({error})") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"{path}: not a latency table (expected \"format\": \"{TABLE_FORMAT}\")")
        if data.get("version") != TABLE_VERSION:
            raise LatencyTableError(f"{path}: latency table version {data.get('version')!r}, this version reads {TABLE_VERSION}")
        return cls(data.get("meta") or {}, data.get("entries") or {})

    @classmethod
    def from_ofa_yaml(cls, paths: Iterable[str | os.PathLike[str]], precision: str = "fp32") -> LatencyTable:
        """Read once-for-all YAML tables (``<key>: {count, mean, std}``, ms); several files (one per
        resolution, as OFA ships them) merge into one table."""
        import yaml

        entries: dict[str, dict[str, Any]] = {}
        sources = []
        for path in paths:
            path = Path(path)
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise LatencyTableError(f"{path}: cannot parse YAML ({error})") from None
            if not isinstance(data, dict):
                raise LatencyTableError(f"{path}: an OFA latency table maps keys to {{count, mean, std}}")
            for key, value in data.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = {"mean": value}
                if not isinstance(value, dict) or "mean" not in value:
                    raise LatencyTableError(f"{path}: entry '{key}' has no 'mean' (got {value!r})")
                entry = {"mean": float(value["mean"])}
                for field in ("median", "std"):
                    if value.get(field) is not None:
                        entry[field] = float(value[field])
                if value.get("count") is not None:
                    entry["count"] = int(value["count"])
                entries[str(key)] = entry
            sources.append(str(path))
        return cls({"source": sources, "format": "ofa-yaml", "unit": "ms"}, {precision: entries})

    # ------------------------------------------------------------------ writing

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temporary file renamed over the old one): a crash never leaves half a table."""
        document = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "meta": self.meta, "entries": self.entries}
        return write_text(path, json.dumps(document, indent=1, sort_keys=False))

    def merge_save(self, path: str | os.PathLike[str]) -> Path:
        """Save, keeping what other processes added to the file since it was read: under a lock,
        the file's entries this table lacks are taken in (this table's own entries win), then the
        union is written atomically. Two profilers writing one table lose nothing and hold each
        key once; each also sees the other's entries and skips measuring them."""
        path = Path(path)
        with locked(path):
            if path.is_file():
                theirs = LatencyTable.load(path)
                differing = [k for k in _RESUME_META if theirs.meta.get(k) != self.meta.get(k)]
                if differing:
                    raise ValueError(f"{path} was rewritten meanwhile with other measurement settings "
                                     f"({', '.join(differing)})")
                for precision, entries in theirs.entries.items():
                    mine = self.entries.setdefault(precision, {})
                    for key, entry in entries.items():
                        mine.setdefault(key, dict(entry))
                self.meta["resolutions"] = sorted(set(theirs.meta.get("resolutions", []))
                                                  | set(self.meta.get("resolutions", [])))
            return self.save(path)

    def add(self, precision: str, key: str, entry: Mapping[str, Any]) -> None:
        self.entries.setdefault(precision, {})[key] = dict(entry)

    # ------------------------------------------------------------------ lookups

    @property
    def precisions(self) -> list[str]:
        return sorted(p for p, table in self.entries.items() if table)

    def keys(self, precision: str) -> set[str]:
        return set(self.entries.get(precision, {}))

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        precision, key = item
        return key in self.entries.get(precision, {})

    def value(self, precision: str, key: str, stat: str = "median") -> float:
        """One entry's statistic (``median`` falls back to ``mean`` for tables that lack it)."""
        entry = self.entries.get(precision, {}).get(key)
        if entry is None:
            raise KeyError(key)
        if stat in entry:
            return float(entry[stat])
        if stat == "median" and "mean" in entry:
            return float(entry["mean"])
        raise KeyError(f"{key} has no '{stat}'")

    def __repr__(self) -> str:
        sizes = {p: len(t) for p, t in self.entries.items()}
        return f"LatencyTable(entries={sizes}, device={self.meta.get('device')!r}, threads={self.meta.get('threads')!r})"


# --------------------------------------------------------------------------- latency model


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

    def __init__(self, space: Any, table: LatencyTable | str | os.PathLike[str], precision: str = "fp32",
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


# --------------------------------------------------------------------------- profiler

#: Per unit kind: does the whole int8 network feed it an int8 tensor / consume its output as int8?
#: (The global pooling runs in float inside the int8 network, see ``convert_to_int8``.)
_INT8_BOUNDARIES: dict[str, tuple[bool, bool]] = {
    "Conv": (False, True),
    "expanded_conv": (True, True),
    "Conv_1": (True, False),
    "Conv_2": (False, True),
    "Logits": (True, False),
}


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


def _int8_runner(module: Any, unit: Unit, x: Any, backend: str, threads: int, workdir: Path) -> tuple[Any, Any]:
    """``(run, input)``: ``run`` executes ``unit`` in int8 taking and returning what the unit takes
    and returns inside an int8 network; ``input`` is ``x`` in that form (for timing it alone)."""
    import torch

    from lightning_nas.deploy.int8 import convert_to_int8, export_onnx, onnx_session

    if unit.kind == "AvgPool2D":  # float inside the int8 network (between a dequantize and a quantize)
        return module.eval(), x
    converted = convert_to_int8(module.eval(), [x], example_input=x)
    if backend == "onnxruntime":
        path = export_onnx(converted, x, workdir / f"{abs(hash(unit.key))}.onnx", dynamic_batch=False)
        session = onnx_session(path, threads=threads)
        name = session.get_inputs()[0].name

        def run(tensor: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: tensor.numpy()})[0])

        return run, x
    strip_input, strip_output = _INT8_BOUNDARIES[unit.kind]
    converted, scale, zero_point = strip_int8_boundaries(converted, strip_input, strip_output)
    if strip_input:
        x = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    return converted, x


def _onnx_overhead_runner(threads: int, workdir: Path) -> Callable[[Any], Any]:
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
    path = workdir / "overhead.onnx"
    onnx.save(model, str(path))
    session = onnx_session(path, threads=threads)
    array = np.zeros((1, 8), dtype=np.float32)
    return lambda _: session.run(None, {"x": array})


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


def _entry(samples: Sequence[float]) -> dict[str, float]:
    return {"count": len(samples), "mean": statistics.fmean(samples), "median": statistics.median(samples),
            "std": statistics.pstdev(samples)}


def _time_unit(run: Any, x: Any, warmup: int, repeats: int, threads: int) -> dict[str, float]:
    """Time one unit alone (``context="isolated"``)."""
    from lightning_nas.deploy.latency import measure_latency

    stats = measure_latency(run, x, warmup=warmup, repeats=repeats, threads=threads)
    return {"count": repeats, "mean": stats["mean_ms"], "median": stats["median_ms"], "std": stats["std_ms"]}


def _time_chain(runners: Sequence[Any], x: Any, warmup: int, repeats: int) -> list[list[float]]:
    """Run ``runners`` as one network (each feeds the next) ``warmup + repeats`` times and return
    every unit's split times (ms) of the timed passes.

    :func:`~lightning_nas.deploy.latency.measure_latency` times one callable; here one pass must
    yield a time per unit, so the units are timed back to back inside the pass.
    """
    import torch

    times: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter
    with torch.inference_mode():
        for step in range(warmup + repeats):
            y = x
            for i, run in enumerate(runners):
                started = clock()
                y = run(y)
                if step >= warmup:
                    times[i].append((clock() - started) * 1000.0)
    return times


def profile_meta(space: Any, resolutions: Sequence[int], batch_size: int, threads: int, int8_backend: str,
                 warmup: int, repeats: int, context: str = "network", realtime: bool = False,
                 rounds: int = 1) -> dict[str, Any]:
    """The metadata written into (and checked when resuming) a profiled table."""
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
        "space": {"name": getattr(space, "name", type(space).__name__),
                  **(space.hparams() if hasattr(space, "hparams") else {})},
        "resolutions": [int(r) for r in resolutions],
        "unit": "ms",
    }
    if int8_backend == "onnxruntime":
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    else:
        meta["quantized_engine"] = "x86"
    return meta


def _open_table(output: Path, meta: Mapping[str, Any]) -> LatencyTable:
    """The existing table at ``output`` when its measurement settings match, else a new one."""
    if not output.is_file():
        return LatencyTable(dict(meta, created=_now()))
    table = LatencyTable.load(output)
    differing = {k: (table.meta.get(k), meta.get(k)) for k in _RESUME_META if table.meta.get(k) != meta.get(k)}
    if differing:
        details = ", ".join(f"{k}: table {old!r} vs now {new!r}" for k, (old, new) in differing.items())
        raise LatencyTableError(f"{output} was measured with other settings ({details}); choose another output path "
                         "or delete the file to start over")
    table.meta["resolutions"] = sorted(set(table.meta.get("resolutions", [])) | set(meta["resolutions"]))
    return table


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def profiling_configs(space: Any, units: UnitDecomposition, resolution: int, seed: int = 0) -> list[dict]:
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
    space: Any,
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
    target: str | None = None,
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
    :func:`realtime_priority`); the table records whether it was granted. ``rounds > 1`` (network
    context) times every profiling network again in later passes over all of them, pooling the
    samples, so that each entry averages over the machine's state during the whole run (shared
    machines drift by tens of percent within minutes); it keeps every profiling network in memory.
    ``target`` (a deployment target name, :mod:`lightning_nas.targets`; default: this host's for
    ``int8_backend``) is recorded in the table's metadata, which searches check it against.
    """
    import torch

    from ..targets import resolve_target

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precisions {list(precisions)} must be a non-empty subset of {list(PRECISIONS)}")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(f"int8_backend {int8_backend!r} must be one of {list(INT8_BACKENDS)}")
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} must be one of {list(CONTEXTS)}")
    if batch_size < 1 or threads < 1 or repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError("batch_size, threads, repeats and rounds must be >= 1 and warmup >= 0")
    output = Path(output)
    resolutions = list(space.resolutions) if resolutions is None else [int(r) for r in resolutions]
    decomposition = UnitDecomposition(space)
    units = decomposition.all_units(resolutions)
    if realtime:
        with realtime_priority() as granted:
            realtime = granted
        if not realtime:
            warnings.warn("real-time priority was not granted (needs root or CAP_SYS_NICE); timing at normal "
                          "priority", RuntimeWarning, stacklevel=2)
    meta = profile_meta(space, resolutions, batch_size, threads, int8_backend, warmup, repeats, context, realtime,
                        rounds)
    table = _open_table(output, meta)
    # recorded, not compared on resume: tables measured before targets have none
    table.meta["target"] = resolve_target(target or f"auto/{int8_backend}").name
    overhead = "int8" in precisions and int8_backend == "onnxruntime"
    total = len(units) * len(precisions) + int(overhead)
    missing = [(p, u.key) for u in units for p in precisions if (p, u.key) not in table]
    skipped = total - len(missing) - int(overhead and ("int8", OVERHEAD_KEY) not in table)
    table.merge_save(output)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    measured = 0
    try:
        with tempfile.TemporaryDirectory() as workdir:
            workdir_path = Path(workdir)
            if overhead and ("int8", OVERHEAD_KEY) not in table:
                runner = _onnx_overhead_runner(threads, workdir_path)
                with realtime_priority(realtime):
                    table.add("int8", OVERHEAD_KEY, _time_unit(runner, None, warmup, repeats, threads))
                table.merge_save(output)
                measured += 1
            if context == "network":
                measured += _profile_networks(space, decomposition, table, output, resolutions, precisions,
                                              batch_size, int8_backend, threads, warmup, repeats, limit, progress,
                                              seed, workdir_path, realtime, rounds)
            else:
                measured += _profile_isolated(space, units, table, output, precisions, batch_size, int8_backend,
                                              threads, warmup, repeats, limit, progress, seed, workdir_path,
                                              realtime)
    finally:
        torch.set_num_threads(threads_before)
    remaining = sum(1 for u in units for p in precisions if (p, u.key) not in table)
    return ProfileResult(output, measured, skipped, remaining)


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("profiling {task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled)


def _record(table: LatencyTable, output: Path, precision: str, key: str, entry: Mapping[str, Any]) -> None:
    table.add(precision, key, entry)
    table.meta["updated"] = _now()
    table.merge_save(output)


def _profile_networks(space: Any, decomposition: UnitDecomposition, table: LatencyTable, output: Path,
                      resolutions: Sequence[int], precisions: Sequence[str], batch_size: int, int8_backend: str,
                      threads: int, warmup: int, repeats: int, limit: int | None, progress: bool, seed: int,
                      workdir: Path, realtime: bool, rounds: int) -> int:
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
    pooled: dict[tuple[str, str], list[float]] = {}  # samples of the keys recorded in this run

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
                    runners = [_int8_runner(m, u, i.clone(), int8_backend, threads, workdir)[0]
                               for m, u, i in zip(modules, network.units, inputs)]
                yield network, precision, runners, x, wanted

    kept: list[tuple[_Network, str, list[Any], Any, set[str]]] = []
    with _progress_bar(progress) as bar:
        task = bar.add_task("profile", total=len(networks) * len(precisions) * rounds, what="")
        for round_index in range(rounds):
            for item in prepare() if round_index == 0 else kept:
                if round_index == 0 and rounds > 1:
                    kept.append(item)
                network, precision, runners, x, wanted = item
                bar.update(task, what=f"{precision} r={network.resolution} network {network.index} "
                                      f"round {round_index + 1}/{rounds}")
                if wanted:
                    with realtime_priority(realtime):
                        times = _time_chain(runners, x, warmup, repeats)
                    for unit, unit_times in zip(network.units, times):
                        if unit.key in wanted:
                            if (precision, unit.key) not in pooled:
                                measured += 1
                            pooled.setdefault((precision, unit.key), []).extend(unit_times)
                    for key in dict.fromkeys(u.key for u in network.units if u.key in wanted):  # unit order
                        _record(table, output, precision, key, _entry(pooled[(precision, key)]))
                bar.advance(task)
    return measured


def _profile_isolated(space: Any, units: Sequence[Unit], table: LatencyTable, output: Path,
                      precisions: Sequence[str], batch_size: int, int8_backend: str, threads: int, warmup: int,
                      repeats: int, limit: int | None, progress: bool, seed: int, workdir: Path,
                      realtime: bool) -> int:
    import torch

    # every precision of a unit in a row, so that a limited (smoke) run still covers all precisions
    todo = [(u, p) for u in units for p in precisions if (p, u.key) not in table]
    if limit is not None:
        todo = todo[: max(int(limit), 0)]
    subnet, choice = None, None
    measured = 0
    with _progress_bar(progress) as bar:
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
                run, x = _int8_runner(module, unit, x, int8_backend, threads, workdir)
            with realtime_priority(realtime):
                entry = _time_unit(run, x, warmup, repeats, threads)
            _record(table, output, precision, unit.key, entry)
            measured += 1
            bar.advance(task)
    return measured


def _subnet_for(space: Any, kernel: int | None, expand: int | None) -> Any:
    """A subnet running every block with ``kernel`` and ``expand`` (all blocks, random weights)."""
    from lightning_nas.nn.builders import build_subnet

    kernel = min(space.kernel_choices) if kernel is None else kernel
    expand = min(space.expand_choices) if expand is None else expand
    config = {"ks": [kernel] * space.num_blocks, "e": [expand] * space.num_blocks,
              "d": [space.max_depth] * space.num_stages, "r": space.resolutions[0]}
    return build_subnet(space, config).eval()
