"""Latency tables: the file format, reading (this package's JSON and once-for-all YAML) and writing.

A table holds the measured latency of every unit of a space (keys: :mod:`.latency_keys`), per
precision. The latency model that sums them is :mod:`.latency_model`, the profiler that measures
them :mod:`.latency_profile` (timing primitives: :mod:`.profiling`), the whole-subnet check of a
table :mod:`.latency_validation`.

**Table file** (JSON)::

    {"format": "lightning-nas/latency-table", "version": 1,
     "meta": {"device": <cpu name>, "machine", "cpu_count", "threads", "batch_size", "torch",
              "int8_backend", "quantized_engine", "target", "context", "realtime", "warmup",
              "repeats", "rounds", "space", "resolutions", "unit": "ms", "validation", ...},
     "entries": {"fp32": {<key>: {"count", "mean", "median", "std"}}, "int8": {...}}}

Every value is milliseconds per forward call of one batch. OFA YAML tables (``<key>: {count, mean,
std}``) are read into the same structure, under a precision of the caller's choice. ``target`` is
the deployment target (:mod:`lightning_nas.targets`) whose engine timed the int8 entries;
``validation`` the figures of the whole-subnet check (:mod:`.latency_validation`).

Each finished entry is written to the table file (an atomic rewrite, merged under a lock with the
entries other processes wrote meanwhile: two profilers may share one table), so an interrupted run
resumes where it stopped; resuming checks that device, threads, batch size, torch version, int8
backend, context, priority and (where the file records them) target and quantized engine are
those of the table.

This module does not import torch.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_nas.files import locked, write_text

__all__ = [
    "CONTEXTS",
    "INT8_BACKENDS",
    "OVERHEAD_KEY",
    "PRECISIONS",
    "TABLE_FORMAT",
    "LatencyTable",
    "LatencyTableError",
    "cpu_name",
    "now",
    "open_table",
    "settings_differ",
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


#: Settings compared on resume only where both the file and the run record them: tables measured
#: before targets have no ``target``, and only int8 units timed in torch depend on the torch engine.
_RESUME_META_IF_RECORDED = ("target", "quantized_engine")


def settings_differ(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (recorded, current)}`` of the measurement settings in which ``current`` differs
    from a table's ``recorded`` ones."""
    differing = {k: (recorded.get(k), current.get(k)) for k in _RESUME_META if recorded.get(k) != current.get(k)}
    differing.update({k: (recorded[k], current[k]) for k in _RESUME_META_IF_RECORDED
                      if k in recorded and k in current and recorded[k] != current[k]})
    return differing


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
                differing = list(settings_differ(theirs.meta, self.meta))
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

    def record(self, path: str | os.PathLike[str], precision: str, key: str, entry: Mapping[str, Any]) -> None:
        """Add one measured entry and write the table at once (:meth:`merge_save`): a profiler
        interrupted after this call keeps the entry."""
        self.add(precision, key, entry)
        self.meta["updated"] = now()
        self.merge_save(path)

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


def open_table(output: str | os.PathLike[str], meta: Mapping[str, Any]) -> LatencyTable:
    """The existing table at ``output`` when its measurement settings match ``meta``, else a new one
    (:class:`LatencyTableError` naming the settings that differ)."""
    output = Path(output)
    if not output.is_file():
        return LatencyTable(dict(meta, created=now()))
    table = LatencyTable.load(output)
    differing = settings_differ(table.meta, meta)
    if differing:
        details = ", ".join(f"{k}: table {old!r} vs now {new!r}" for k, (old, new) in differing.items())
        raise LatencyTableError(f"{output} was measured with other settings ({details}); choose another output path "
                                "or delete the file to start over")
    table.meta["resolutions"] = sorted(set(table.meta.get("resolutions", [])) | set(meta["resolutions"]))
    for key in _RESUME_META_IF_RECORDED:  # a table from before targets takes them on from now
        if key in meta:
            table.meta[key] = meta[key]
    return table


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
