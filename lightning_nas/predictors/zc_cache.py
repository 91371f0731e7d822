"""Node-wise zero-cost statistics for many NAS-Bench-201 architectures, cached and resumable.

Cache format (JSON lines, append-only so an interrupted run loses at most the line being written):

* line 1, a header: ``{"format": "lightning-nas/zc-stats", "version": 2, "slots": [...],
  "seed": int, "batch": str}`` (``batch`` fingerprints the images / labels, so a cache is never
  silently reused with another batch or seed);
* then records ``{"arch": str, "proxies": [K], "scores": [K], "nodes": [K][L], "seconds": float}``
  where ``nodes[k][l]`` is proxy ``k`` at weight slot ``l`` of
  :func:`lightning_nas.spaces.nb201.weight_slot_names` (0 where the edge op has no weights) and
  ``seconds`` the wall time of that record's proxies together.

An architecture may have several records (e.g. cheap proxies for every architecture first, an
expensive one later for a subset); they are merged on reading. Rerunning with the same
arguments computes only the (architecture, proxy) pairs missing from the file. One writer at a
time: two processes appending to the same cache are not coordinated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_nas.errors import RecipeError
from lightning_nas.nn.builders import build_subnet
from lightning_nas.spaces.nb201 import NB201Space, format_arch, parse_arch

CACHE_FORMAT = "lightning-nas/zc-stats"
CACHE_VERSION = 2
DEFAULT_PROXIES: tuple[str, ...] = (
    "grad_norm", "snip", "grasp", "fisher", "jacov", "synflow", "nwot", "zen", "params", "flops",
)
#: ParZC's node-wise inputs: every proxy but grasp, whose Hessian-vector product through batch
#: norm costs more on a CPU than the other nine together (and it is the weakest proxy).
PARZC_PROXIES: tuple[str, ...] = tuple(p for p in DEFAULT_PROXIES if p != "grasp")
# Per-channel statistics used by NAS-Bench-201 for CIFAR (pixel values / 255).
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class ZCStatistics:
    """Arrays of a statistics cache, rows in the order of ``archs``, columns in that of ``proxies``."""

    archs: list[str]
    proxies: list[str]
    slots: list[str]
    nodes: np.ndarray  # [A, L, K] node-wise statistics
    scores: np.ndarray  # [A, K] aggregate proxy scores
    seconds: np.ndarray  # [A] wall time of the records these values came from
    seed: int = 0  # network init and batch seed the statistics were computed with

    def select(self, archs: Sequence[str]) -> ZCStatistics:
        index = {a: i for i, a in enumerate(self.archs)}
        missing = [a for a in archs if a not in index]
        if missing:
            raise KeyError(f"{len(missing)} architectures are not in the statistics, e.g. {missing[0]!r}")
        rows = [index[a] for a in archs]
        return ZCStatistics(list(archs), self.proxies, self.slots, self.nodes[rows], self.scores[rows],
                            self.seconds[rows], self.seed)


@dataclass
class _Entry:
    """Everything known about one architecture: per proxy (score, nodes, id of its record)."""

    values: dict[str, tuple[float, list[float], int]]
    seconds: dict[int, float]  # record id -> wall seconds


def load_cifar10_batch(
    path: str | Path, batch_size: int = 64, seed: int = 0,
    key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (by seed) normalised batch from an ``.npz`` with ``x`` uint8 NHWC and ``y`` int."""
    from ..npz import load_npz

    x_all, y_all = load_npz(path, key)  # ``key``: the recipe key that named the file, for its errors
    if batch_size > len(y_all):
        raise RecipeError(f"a batch of {batch_size} images is more than the {len(y_all)} images in the file",
                          key=key, given=str(path), allowed=f"a batch_size of at most {len(y_all)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(y_all), size=batch_size, replace=False))
    x = torch.from_numpy(np.ascontiguousarray(x_all[idx])).permute(0, 3, 1, 2).float().div(255.0)
    y = torch.from_numpy(np.asarray(y_all[idx], dtype=np.int64))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, y


def batch_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def align_to_slots(node_stats: dict[str, float], slots: Sequence[str]) -> list[float]:
    """Node statistics keyed by module name -> one value per slot, 0 for absent layers."""
    unknown = set(node_stats) - set(slots)
    if unknown:
        raise ValueError(f"layers {sorted(unknown)[:3]} do not match any weight slot")
    return [float(node_stats.get(s, 0.0)) for s in slots]


def architecture_statistics(
    arch: str, proxies: Sequence[str], images: torch.Tensor, labels: torch.Tensor, seed: int,
    space: NB201Space | None = None,
) -> dict:
    """One cache record: build the network (initialised from ``seed``) and run the proxies."""
    from lightning_nas.predictors.zero_cost import compute_proxies

    space = space or NB201Space()
    slots = space.weight_slots()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_subnet(space, arch)
    results = compute_proxies(list(proxies), model, images, labels, seed)
    return {
        "arch": arch,
        "proxies": list(proxies),
        "scores": [results[p].score for p in proxies],
        "nodes": [align_to_slots(results[p].node_stats, slots) for p in proxies],
        "seconds": time.perf_counter() - start,
    }


def _header(slots: Sequence[str], seed: int, fingerprint: str) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "slots": list(slots), "seed": int(seed),
            "batch": fingerprint}


def read_cache(cache_path: str | Path) -> tuple[dict, dict[str, _Entry]]:
    """Header and merged records (by architecture); a truncated last line is ignored."""
    path = Path(cache_path)
    with path.open() as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = json.loads(lines[0])
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a zero-cost statistics cache")
    if header.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} has cache version {header.get('version')}, expected {CACHE_VERSION}")
    entries: dict[str, _Entry] = {}
    for rec_id, line in enumerate(lines[1:]):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when a run was interrupted
        entry = entries.setdefault(rec["arch"], _Entry({}, {}))
        entry.seconds[rec_id] = float(rec["seconds"])
        for proxy, score, nodes in zip(rec["proxies"], rec["scores"], rec["nodes"]):
            entry.values[proxy] = (float(score), nodes, rec_id)
    return header, entries


def common_proxies(entries: Iterable[_Entry]) -> list[str]:
    """Proxies every architecture has, in :data:`DEFAULT_PROXIES` order (others after, sorted)."""
    sets = [set(e.values) for e in entries]
    common = set.intersection(*sets) if sets else set()
    return [p for p in DEFAULT_PROXIES if p in common] + sorted(common - set(DEFAULT_PROXIES))


def _to_arrays(header: dict, entries: dict[str, _Entry], archs: Sequence[str], proxies: Sequence[str]) -> ZCStatistics:
    slots = header["slots"]
    nodes = np.zeros((len(archs), len(slots), len(proxies)), dtype=np.float64)
    scores = np.zeros((len(archs), len(proxies)), dtype=np.float64)
    seconds = np.zeros(len(archs), dtype=np.float64)
    for i, arch in enumerate(archs):
        entry = entries.get(arch)
        missing = [p for p in proxies if entry is None or p not in entry.values]
        if missing:
            raise KeyError(f"{arch!r} has no cached {', '.join(missing)}")
        used_records = set()
        for k, proxy in enumerate(proxies):
            score, node_values, rec_id = entry.values[proxy]
            scores[i, k] = score
            nodes[i, :, k] = node_values
            used_records.add(rec_id)
        seconds[i] = sum(entry.seconds[r] for r in used_records)
    return ZCStatistics(list(archs), list(proxies), list(slots), nodes, scores, seconds, int(header["seed"]))


def load_statistics(
    cache_path: str | Path, archs: Sequence[str] | None = None, proxies: Sequence[str] | None = None
) -> ZCStatistics:
    """Arrays from a cache. ``proxies=None``: those common to the selected architectures;
    ``archs=None``: every architecture that has all of ``proxies`` (cache order)."""
    header, entries = read_cache(cache_path)
    if archs is not None:
        archs = [format_arch(parse_arch(a)) for a in archs]
        if proxies is None:
            proxies = common_proxies(entries[a] for a in archs if a in entries)
    else:
        if proxies is None:
            proxies = common_proxies(entries.values())
        archs = [a for a, e in entries.items() if all(p in e.values for p in proxies)]
    return _to_arrays(header, entries, archs, list(proxies))


def compute_statistics(
    arch_strings: Sequence[str],
    proxies: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    cache_path: str | Path | None = None,
    progress: bool = True,
    space: NB201Space | None = None,
) -> ZCStatistics:
    """Node-wise statistics of ``proxies`` for every architecture (rows in input order).

    With ``cache_path`` every finished architecture is appended to the cache at once, and
    (architecture, proxy) pairs already there are not recomputed, so an interrupted run resumes
    where it stopped. ``images`` / ``labels``: one batch (see :func:`load_cifar10_batch`).
    """
    space = space or NB201Space()
    proxies = list(proxies)
    archs = [format_arch(parse_arch(a)) for a in arch_strings]
    header = _header(space.weight_slots(), seed, batch_fingerprint(images, labels))
    entries: dict[str, _Entry] = {}
    path = None if cache_path is None else Path(cache_path)
    if path is not None and path.exists() and path.stat().st_size > 0:
        old_header, entries = read_cache(path)
        if old_header != header:
            diff = sorted(k for k in header if header[k] != old_header.get(k))
            raise ValueError(f"cache {path} was written with different settings ({', '.join(diff)}); "
                             "use another cache path")
    todo = [(a, missing) for a in dict.fromkeys(archs)
            if (missing := [p for p in proxies if a not in entries or p not in entries[a].values])]
    sink = None
    # Only touch the file when there is something to add: a fully cached call is read-only
    # (safe while another process is still filling the same cache).
    if path is not None and todo:
        if path.exists() and path.stat().st_size > 0:
            _drop_partial_last_line(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")
        sink = path.open("a")
    next_id = 1 + max((r for e in entries.values() for r in e.seconds), default=-1)
    try:
        for arch, missing in _progress(todo, progress, len(archs) - len(todo)):
            rec = architecture_statistics(arch, missing, images, labels, seed, space)
            entry = entries.setdefault(arch, _Entry({}, {}))
            entry.seconds[next_id] = rec["seconds"]
            for proxy, score, nodes in zip(rec["proxies"], rec["scores"], rec["nodes"]):
                entry.values[proxy] = (score, nodes, next_id)
            next_id += 1
            if sink is not None:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return _to_arrays(header, entries, archs, proxies)


def _drop_partial_last_line(path: Path) -> None:
    # A run killed mid-write leaves a line without its newline; appending after it would
    # corrupt the next record too.
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _progress(items: list, enabled: bool, done: int) -> Iterator:
    """``items`` with a progress bar of architectures on stderr (the bar ends with the loop)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"zero-cost statistics ({done} cached)"), BarColumn(), MofNCompleteColumn(),
               TextColumn("arch"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as progress:
        yield from progress.track(items, total=len(items))


__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "DEFAULT_PROXIES", "ZCStatistics", "align_to_slots", "architecture_statistics",
    "batch_fingerprint", "common_proxies", "compute_statistics", "load_cifar10_batch", "load_statistics",
    "read_cache",
]
