"""SpaceEvo's space search over tables: the Q-T score and the aging evolution over spaces.

Inputs are tables of sampled sub-stages (:class:`SpaceEvoTables`): per cell (stage index, block
type), rows of (width, depth, kernel, expand, int8 latency in ms, normalised int8 loss), as the
block-wise distillation and the latency model produce them. Nothing here builds a network.

A subnet of a space (:class:`~lightning_nas.spaces.spaceevo_layout.SpaceChoice`) is drawn by
taking, for every stage, a uniform row of the cell (stage, block type) whose width lies in the
stage's window; the rows are themselves uniform samples of the cell's sub-stages, so this is the
reference's uniform subnet sampling. Its latency is a fixed part (stem and head, a parameter) plus
the sum of its stages' latencies; its loss is the sum of its stages' losses. Why a sum: each
stage's loss is the normalised squared error of that stage's output given the teacher's input, the
reference adds these block-wise losses into the subnet's loss, and errors of successive stages add
up along the network to first order.

Q-T score of a space (:func:`qt_score`): for each latency budget ``c``, draw ``N`` subnets;
``p`` = share of them with latency <= ``c``; ``L`` = mean of the ``k`` lowest losses among those
(all of them when fewer than ``k`` fit); ``T = max(1, (t / p) ** a)``; the score is the sum over
budgets of ``1 / (T * L)``. A budget no drawn subnet fits (``p = 0``) adds 0: the space has nothing
to offer there, and ``T`` would be infinite. Each budget's ``p``, ``L`` and ``T`` are reported, so
one can see whether the latency term matters: with the reference's ``a = 0.01``, ``T`` is at most
``(t * N) ** a`` whenever one subnet fits (1.096 for ``t = 0.1, N = 100,000``; 1.072 at
``N = 10,000``), so ``L`` dominates.

A space's subnets are drawn from a generator seeded by the search seed and the space's vector, so a
space has one score whatever order the evolution meets it in (and re-scoring it is pointless).

Evolution (:func:`evolve_spaces`): every homogeneous space is evaluated first, then random spaces
fill the population; each cycle samples ``sample_size`` members, and the best of them yields two
children, one by :func:`~lightning_nas.spaces.spaceevo_layout.mutate_block_type` and one by
:func:`~lightning_nas.spaces.spaceevo_layout.mutate_window`; each child joins the population and
the oldest member leaves (aging). No space is evaluated twice: a child equal to a space already
evaluated is mutated again from the parent, up to ``max_retries`` times, then drawn from the unseen
neighbours of that mutation kind (enumerated), and dropped when there is none; a parent none of
whose neighbours is unseen leaves the population. Exactly ``evaluations`` spaces are evaluated
unless the reachable spaces run out first (``exhausted`` in the result).

Torch-free (numpy).
"""

from __future__ import annotations

import csv
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing
from ..spaces.spaceevo_layout import (
    BLOCK_TYPES,
    CIFAR_LAYOUT,
    MacroLayout,
    SpaceChoice,
    StageChoice,
    encode,
    homogeneous_spaces,
    mutate_block_type,
    mutate_window,
    random_space,
    stage_windows,
    validate,
)

__all__ = [
    "COLUMNS",
    "BudgetScore",
    "CellTable",
    "EvaluatedSpace",
    "QTScore",
    "QTSettings",
    "SpaceEvoTables",
    "SpaceSearchResult",
    "evolve_spaces",
    "qt_score",
    "sample_subnets",
]

#: Columns of a table file, one row per sampled sub-stage.
COLUMNS = ("stage", "block_type", "width", "depth", "kernel", "expand", "latency_ms", "loss")


@dataclass(frozen=True)
class CellTable:
    """The sampled sub-stages of one cell (stage, block type), one numpy column per field."""

    stage: int
    block_type: str
    width: np.ndarray
    depth: np.ndarray
    kernel: np.ndarray
    expand: np.ndarray
    latency_ms: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)


class SpaceEvoTables:
    """Sub-stage tables of every cell of a layout (see the module docstring).

    Args:
        cells: the tables by ``(stage, block_type)``.
        layout: the macro layout the rows must fit (widths of the stage, choices of the block type).
        source: the file the tables came from, named in errors.
    """

    def __init__(self, cells: Mapping[tuple[int, str], CellTable], layout: MacroLayout = CIFAR_LAYOUT,
                 source: str | None = None) -> None:
        self.layout = layout
        self.source = source
        self.cells = dict(cells)
        self._windows: dict[tuple[int, str, tuple[int, int]], tuple[np.ndarray, np.ndarray]] = {}
        self._values: dict[tuple[int, str, tuple[int, int]], np.ndarray] = {}

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], layout: MacroLayout = CIFAR_LAYOUT,
                  source: str | None = None) -> SpaceEvoTables:
        """Tables from row mappings with the keys of :data:`COLUMNS` (values may be strings)."""
        grouped: dict[tuple[int, str], list[tuple[int, int, int, float, float, float]]] = {}
        for number, row in enumerate(rows):
            stage, block_type, values = _check_row(row, number, layout, source)
            grouped.setdefault((stage, block_type), []).append(values)
        cells = {}
        for (stage, block_type), values in sorted(grouped.items()):
            columns = list(zip(*values))
            cells[stage, block_type] = CellTable(
                stage, block_type, np.array(columns[0], dtype=np.int64), np.array(columns[1], dtype=np.int64),
                np.array(columns[2], dtype=np.int64), np.array(columns[3], dtype=np.float64),
                np.array(columns[4], dtype=np.float64), np.array(columns[5], dtype=np.float64))
        return cls(cells, layout, source)

    def rows(self) -> Iterator[dict[str, Any]]:
        for (stage, block_type), cell in sorted(self.cells.items()):
            for i in range(len(cell)):
                yield {"stage": stage, "block_type": block_type, "width": int(cell.width[i]),
                       "depth": int(cell.depth[i]), "kernel": int(cell.kernel[i]),
                       "expand": float(cell.expand[i]), "latency_ms": float(cell.latency_ms[i]),
                       "loss": float(cell.loss[i])}

    def save_csv(self, path: str | Path) -> Path:
        """Write every row to ``path`` (temporary name, then rename); floats keep full precision."""
        with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows():
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        return Path(path)

    @classmethod
    def load_csv(cls, path: str | Path, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceEvoTables:
        path = Path(path)
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise RecipeError("table file lacks columns", source=str(path), key="columns",
                                  given=reader.fieldnames, allowed=COLUMNS)
            return cls.from_rows(list(reader), layout, source=str(path))

    def window_rows(self, stage: int, block_type: str, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Latency and loss columns of the cell's rows whose width lies in ``window`` (cached)."""
        key = (stage, block_type, tuple(window))
        if key not in self._windows:
            cell = self.cells.get((stage, block_type))
            widths = self.layout.stages[stage].widths[window[0]:window[1]]
            if cell is None:
                raise RecipeError("the tables have no rows for this cell", source=self.source,
                                  key=f"stage {stage}, block_type {block_type}", given="no rows",
                                  allowed="one cell per (stage, block type) of the layout")
            keep = np.isin(cell.width, widths)
            if not keep.any():
                raise RecipeError("the tables have no rows in this window", source=self.source,
                                  key=f"stage {stage}, block_type {block_type}", given=f"window {window}",
                                  allowed=f"rows with a width in {list(widths)} (the cell has "
                                  f"{sorted(set(cell.width.tolist()))})")
            self._windows[key] = (cell.latency_ms[keep], cell.loss[keep])
        return self._windows[key]

    def window_values(self, stage: int, block_type: str, window: tuple[int, int]) -> np.ndarray:
        """:meth:`window_rows` as one complex column, latency + 1j * loss (cached; the sampler's form)."""
        key = (stage, block_type, tuple(window))
        if key not in self._values:
            latency, loss = self.window_rows(stage, block_type, window)
            self._values[key] = latency + 1j * loss
        return self._values[key]

    def check_complete(self) -> None:
        """:class:`RecipeError` unless every stage window of every block type has rows."""
        cells = [(stage, block_type) for stage in range(self.layout.num_stages)
                 for block_type in self.layout.block_types]
        missing = [f"{stage}/{block_type}" for stage, block_type in cells if (stage, block_type) not in self.cells]
        if missing:
            raise RecipeError("the tables have no rows for this cell", source=self.source, key="cells",
                              given=", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
                              allowed="one cell per (stage, block type) of the layout")
        for stage, block_type in cells:
            for window in stage_windows(stage, self.layout):
                self.window_rows(stage, block_type, window)


def _check_row(row: Mapping[str, Any], number: int, layout: MacroLayout,
               source: str | None) -> tuple[int, str, tuple[int, int, int, float, float, float]]:
    def value(column: str, kind: type) -> Any:
        if column not in row:
            raise RecipeError("row lacks a column", source=source, key=f"row {number}.{column}",
                              given=sorted(row), allowed=COLUMNS)
        try:
            return kind(row[column]) if kind is not int else int(str(row[column]))
        except (TypeError, ValueError):
            raise RecipeError(f"not a{'n integer' if kind is int else ' number'}", source=source,
                              key=f"row {number}.{column}", given=row[column]) from None

    def check(column: str, given: Any, allowed: Sequence[Any]) -> None:
        if given not in allowed:
            raise RecipeError(f"{column} not in the layout", source=source, key=f"row {number}.{column}",
                              given=given, allowed=[str(a) for a in allowed])

    stage = value("stage", int)
    check("stage", stage, range(layout.num_stages))
    block_type = value("block_type", str)
    check("block_type", block_type, layout.block_types)
    spec = BLOCK_TYPES[block_type]
    width, depth, kernel = value("width", int), value("depth", int), value("kernel", int)
    expand = value("expand", float)
    check("width", width, layout.stages[stage].widths)
    check("depth", depth, spec.depths)
    check("kernel", kernel, spec.kernels)
    check("expand", expand, spec.expands)
    latency, loss = value("latency_ms", float), value("loss", float)
    for column, number_ in (("latency_ms", latency), ("loss", loss)):
        if not math.isfinite(number_) or number_ < 0:
            raise RecipeError(f"{column} must be finite and >= 0", source=source,
                              key=f"row {number}.{column}", given=number_)
    return stage, block_type, (width, depth, kernel, expand, latency, loss)


# ---------------------------------------------------------------------------------------------
# Q-T score

@dataclass(frozen=True)
class QTSettings:
    """Parameters of the Q-T score (reference: 100,000 subnets, k = 50, t = 0.08-0.1, a = 0.01).

    Args:
        budgets_ms: latency budgets ``c`` (ms).
        num_subnets: subnets ``N`` drawn per budget.
        top_k: ``k``, how many of the lowest feasible losses ``L`` averages.
        t: share of feasible subnets from which on ``T`` is 1.
        a: exponent of the latency term.
        fixed_latency_ms: latency of the fixed parts (stem, head) added to every subnet.
        seed: with the space's vector, seeds the subnet draws of a space.
    """

    budgets_ms: tuple[float, ...]
    num_subnets: int = 100_000
    top_k: int = 50
    t: float = 0.1
    a: float = 0.01
    fixed_latency_ms: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets_ms", tuple(float(b) for b in self.budgets_ms))
        checks = (
            ("budgets_ms", bool(self.budgets_ms) and all(math.isfinite(b) and b > 0 for b in self.budgets_ms),
             "one or more positive latencies (ms)"),
            ("num_subnets", self.num_subnets >= 1, "an integer >= 1"),
            ("top_k", self.top_k >= 1, "an integer >= 1"),
            ("t", 0 < self.t <= 1, "a share in (0, 1]"),
            ("a", self.a >= 0, "a number >= 0"),
            ("fixed_latency_ms", self.fixed_latency_ms >= 0, "a latency >= 0 (ms)"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise RecipeError("invalid Q-T score setting", key=key, given=getattr(self, key), allowed=allowed)


@dataclass(frozen=True)
class BudgetScore:
    """One budget's terms: ``p`` (share feasible), ``loss`` (``L``; NaN when ``p = 0``),
    ``latency_term`` (``T``; NaN when ``p = 0``) and ``contribution`` ``1 / (T L)`` (0 when ``p = 0``)."""

    budget_ms: float
    p: float
    loss: float
    latency_term: float
    contribution: float


@dataclass(frozen=True)
class QTScore:
    score: float
    budgets: tuple[BudgetScore, ...]


#: Subnets drawn per pass over the stages: the working columns (a few 64 KiB) stay in the cache.
_CHUNK = 8192


def sample_subnets(tables: SpaceEvoTables, choice: SpaceChoice, rng: np.random.Generator, size: int | tuple[int, ...],
                   fixed_latency_ms: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Latencies and losses of ``size`` subnets of ``choice`` drawn from the tables (module docstring).

    Speed (the whole search is this function; ~3x ``Generator.integers`` and fancy indexing over
    the whole sample, measured in one process): subnets are drawn in chunks of :data:`_CHUNK` so the
    temporaries stay in the cache; a stage's row index is the top half of ``bits * rows`` for 32
    random bits (two stages per 64-bit draw of the generator), uniform to within ``rows / 2**32``
    (below 1e-7 for any table here); latency and loss travel as one complex column
    (latency + 1j * loss), so a stage costs one gather and one add.
    """
    shape = (size,) if isinstance(size, int) else tuple(size)
    total = math.prod(shape)
    columns = [tables.window_values(stage, stage_choice.block_type, stage_choice.window)
               for stage, stage_choice in enumerate(choice.stages)]
    acc = np.full(total, complex(fixed_latency_ms, 0.0))
    low, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    bit_generator = rng.bit_generator
    for start in range(0, total, _CHUNK):
        part = acc[start:start + _CHUNK]
        raw = np.empty(0, dtype=np.uint64)
        for stage, values in enumerate(columns):
            if stage % 2 == 0:
                raw = bit_generator.random_raw(len(part))
                bits = raw & low
            else:
                bits = raw >> shift
            bits *= np.uint64(len(values))
            bits >>= shift
            part += values.take(bits.view(np.int64))
    return acc.real.reshape(shape), acc.imag.reshape(shape)


def _space_rng(settings: QTSettings, vector: Sequence[int]) -> np.random.Generator:
    return np.random.default_rng([settings.seed, *vector])


def qt_score(tables: SpaceEvoTables, choice: Any, settings: QTSettings) -> QTScore:
    """The Q-T score of a space (module docstring), with each budget's ``p``, ``L`` and ``T``."""
    choice = validate(choice, tables.layout)
    rng = _space_rng(settings, encode(choice, tables.layout))
    latencies, losses = sample_subnets(tables, choice, rng, (len(settings.budgets_ms), settings.num_subnets),
                                       settings.fixed_latency_ms)
    results = []
    for budget, latency, loss in zip(settings.budgets_ms, latencies, losses):
        feasible = loss[latency <= budget]
        p = len(feasible) / settings.num_subnets
        if not len(feasible):
            results.append(BudgetScore(budget, 0.0, math.nan, math.nan, 0.0))
            continue
        k = min(settings.top_k, len(feasible))
        best = np.partition(feasible, k - 1)[:k] if k < len(feasible) else feasible
        mean_loss = float(best.mean())
        term = max(1.0, (settings.t / p) ** settings.a)
        # a zero loss (a perfect table) would make the score infinite; that is the honest value
        contribution = math.inf if mean_loss == 0 else 1.0 / (term * mean_loss)
        results.append(BudgetScore(budget, p, mean_loss, term, contribution))
    return QTScore(float(sum(r.contribution for r in results)), tuple(results))


# ---------------------------------------------------------------------------------------------
# evolution over spaces

@dataclass(frozen=True)
class EvaluatedSpace:
    """One evaluated space: its order of evaluation, how it was made, its parent and its score."""

    index: int
    space: SpaceChoice
    origin: str  # "homogeneous", "random", "block_type" or "window"
    parent: str | None
    score: QTScore

    def row(self) -> dict[str, Any]:
        """A flat record (space id, score, and per budget ``p``, ``L``, ``T``) for CSV or JSON."""
        out: dict[str, Any] = {"index": self.index, "space": self.space.id, "origin": self.origin,
                               "parent": self.parent or "", "score": self.score.score}
        for i, budget in enumerate(self.score.budgets):
            out.update({f"budget{i}_ms": budget.budget_ms, f"p{i}": budget.p, f"L{i}": budget.loss,
                        f"T{i}": budget.latency_term})
        return out


@dataclass
class SpaceSearchResult:
    history: list[EvaluatedSpace]
    #: Evaluations asked for, and whether the reachable spaces ran out before.
    budget: int
    exhausted: bool
    #: Children dropped because every retry gave a space already evaluated.
    dropped_duplicates: int
    seconds: float
    settings: QTSettings
    stats: dict[str, int] = field(default_factory=dict)

    def best(self, n: int = 10) -> list[EvaluatedSpace]:
        """The ``n`` highest-scoring spaces (ties: the earlier evaluated first)."""
        return sorted(self.history, key=lambda e: (-e.score.score, e.index))[:n]


def evolve_spaces(tables: SpaceEvoTables, settings: QTSettings, *, population_size: int = 500,
                  sample_size: int = 125, evaluations: int = 5000, seed: int = 0, max_retries: int = 50,
                  progress: Callable[[EvaluatedSpace], None] | None = None) -> SpaceSearchResult:
    """Aging evolution over the spaces of ``tables.layout`` (module docstring).

    Args:
        tables: sub-stage tables of every cell the search may meet.
        settings: the Q-T score's parameters.
        population_size: ``P``, members kept (the oldest leaves when a child joins a full one).
        sample_size: ``S``, members drawn per cycle (without replacement); the best is the parent.
        evaluations: ``C``, spaces scored in all, homogeneous seeds and random fill included.
        seed: seeds the evolution's generator (sampling and mutation; subnet draws use
            ``settings.seed``).
        max_retries: mutations tried per child before a child that is always a duplicate is dropped.
        progress: called with every space once it is evaluated (a progress bar, a live plot).
    """
    for key, value, low in (("population_size", population_size, 1), ("sample_size", sample_size, 1),
                            ("evaluations", evaluations, 1), ("max_retries", max_retries, 1)):
        if int(value) != value or value < low:
            raise RecipeError("must be a positive integer", key=key, given=value, allowed=f"an integer >= {low}")
    if sample_size > population_size:
        raise RecipeError("the sample cannot exceed the population", key="sample_size", given=sample_size,
                          allowed=f"1..population_size ({population_size})")
    layout = tables.layout
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    history: list[EvaluatedSpace] = []
    seen: set[SpaceChoice] = set()
    population: deque[EvaluatedSpace] = deque()
    dropped = 0

    def evaluate(space: SpaceChoice, origin: str, parent: str | None) -> EvaluatedSpace:
        seen.add(space)
        entry = EvaluatedSpace(len(history), space, origin, parent, qt_score(tables, space, settings))
        history.append(entry)
        population.append(entry)
        if len(population) > population_size:
            population.popleft()
        if progress is not None:
            progress(entry)
        return entry

    for space in homogeneous_spaces(layout):
        if len(history) == evaluations:
            break
        if space not in seen:
            evaluate(space, "homogeneous", None)
    # random fill; a bounded number of draws so a tiny layout cannot loop forever
    draws = 0
    while len(population) < population_size and len(history) < evaluations and draws < max_retries * population_size:
        draws += 1
        space = random_space(rng, layout)
        if space not in seen:
            evaluate(space, "random", None)
    exhausted = False
    while len(history) < evaluations:
        if not population:
            exhausted = True
            break
        members = list(population)
        picked = rng.choice(len(members), size=min(sample_size, len(members)), replace=False)
        parent = max((members[i] for i in picked), key=lambda e: (e.score.score, -e.index))
        produced = 0
        for origin, mutate in (("block_type", mutate_block_type), ("window", mutate_window)):
            if len(history) == evaluations:
                break
            child = _fresh_child(parent.space, origin, mutate, rng, seen, layout, max_retries)
            if child is None:
                dropped += 1
            else:
                evaluate(child, origin, parent.space.id)
                produced += 1
        if not produced and len(history) < evaluations:
            # every one-mutation neighbour of the parent is evaluated: it can have no child, so it
            # leaves the population instead of winning samples forever
            population.remove(parent)
    return SpaceSearchResult(history, evaluations, exhausted, dropped, time.perf_counter() - started, settings,
                             stats={"homogeneous": sum(e.origin == "homogeneous" for e in history),
                                    "random": sum(e.origin == "random" for e in history),
                                    "block_type": sum(e.origin == "block_type" for e in history),
                                    "window": sum(e.origin == "window" for e in history)})


def _fresh_child(parent: SpaceChoice, origin: str, mutate: Any, rng: np.random.Generator, seen: set[SpaceChoice],
                 layout: MacroLayout, max_retries: int) -> SpaceChoice | None:
    """A child of ``parent`` by ``mutate`` not evaluated yet: up to ``max_retries`` mutations, then
    a uniform pick among the unseen neighbours of that mutation kind (a bounded enumeration), or
    ``None`` when there are none."""
    for _ in range(max_retries):
        child = mutate(parent, rng, layout)
        if child not in seen:
            return child
    unseen = [n for n in _neighbours(parent, layout, origin) if n not in seen]
    return unseen[int(rng.integers(len(unseen)))] if unseen else None


def _neighbours(space: SpaceChoice, layout: MacroLayout, origin: str) -> list[SpaceChoice]:
    """Every space one ``origin`` mutation ("block_type" or "window") away from ``space``."""
    out = []
    for index, stage in enumerate(space.stages):
        if origin == "block_type":
            changed = [StageChoice(name, stage.window) for name in layout.block_types if name != stage.block_type]
        else:
            changed = [StageChoice(stage.block_type, w) for w in stage_windows(index, layout) if w != stage.window]
        for new in changed:
            stages = list(space.stages)
            stages[index] = new
            out.append(SpaceChoice(tuple(stages)))
    return out
