"""``lightning-nas search`` with a ``spaceevo:`` section: SpaceEvo's search over spaces.

Reads two tables by path (the section's ``latency`` and ``losses``), as earlier stages wrote them
into their run directories:

* ``spaceevo_latency.csv`` (with ``spaceevo_latency.csv.meta.json``) of
  ``lightning-nas profile recipes/latency_lut_spaceevo.yaml``: int8 latency of sampled sub-stages
  on the deployment target;
* ``losses.csv`` of ``lightning-nas distill recipes/spaceevo_distill_cifar10.yaml``: int8 loss of
  sampled sub-stages after block-wise distillation.

They are joined on the sub-stage key (stage, block type, width, depth, kernel, expand) into
:class:`~lightning_nas.search.spaceevo.SpaceEvoTables`: a sub-stage takes part when both tables
have it (the distillation's recipe scores every sub-stage of a cell, the profile a sample, so the
join is the latency sample). No latency is predicted for a sub-stage the profile did not time.
Every window of every (stage, block type) cell of the layout must keep rows, since the evolution
can reach any of them; the error names the cell and which table lacks it.

The latency table's recorded target must be the search's (the project's mixing rule, see
:func:`~lightning_nas.targets.check_same_target`); the loss table records none. Budgets are given in
ms (``budgets_ms``) or as percentiles of the latency of random subnets of random spaces
(``budget_percentiles``, resolved once from the joined tables and recorded). A subnet's latency is
``fixed_latency_ms`` (what the tables leave out: stem, head; by default the stem and widest head
the profile's self-validation timed, :func:`fixed_parts_ms`) plus the latency table's ONNX
Runtime call overhead (``overhead_ms`` of its meta, taken off every row when it was measured)
plus its stages' rows.

Then :func:`~lightning_nas.search.spaceevo.evolve_spaces` (homogeneous spaces first, random fill,
two children per cycle, aging) and, into the run directory, each written to a temporary name and
renamed:

* ``spaces.csv``: every evaluated space in evaluation order (index, origin, parent, id, per stage
  block type / window / widths, per budget ``p``, ``L``, ``T`` and the budget's ``1 / (T L)``, the
  Q-T score), floats at full precision;
* ``evolution.png``: every space's score by evaluation, the best so far, the homogeneous spaces as
  horizontal lines;
* ``best_spaces.json`` (written last: its presence means the run finished): the ``top_k`` spaces
  with their per-budget terms, the homogeneous baselines, the resolved budgets, the evolution's
  counts and the paths, SHA-256 and meta of the tables it read.

A run is deterministic for a seed (subnet draws are seeded per space) and takes seconds to
minutes, so a rerun into the same run directory recomputes and replaces the three files rather
than resuming.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing, save_png, write_json
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from .common import prepare_run_dir

SPACES_CSV = "spaces.csv"
BEST_JSON = "best_spaces.json"
EVOLUTION_PNG = "evolution.png"

#: What writes each table: (file name, recipe, command), named in the errors.
PRODUCERS = {
    "latency": ("spaceevo_latency.csv", "recipes/latency_lut_spaceevo.yaml",
                "lightning-nas profile recipes/latency_lut_spaceevo.yaml"),
    "losses": ("losses.csv", "recipes/spaceevo_distill_cifar10.yaml",
               "lightning-nas distill recipes/spaceevo_distill_cifar10.yaml"),
}
#: Random spaces x subnets per space whose latencies ``budget_percentiles`` are taken from.
PERCENTILE_SPACES = 200
PERCENTILE_SUBNETS = 200


@dataclasses.dataclass
class JoinedTables:
    """The joined tables and what the join kept and dropped."""

    tables: Any  # SpaceEvoTables
    latency_rows: int
    loss_rows: int
    joined_rows: int
    rows_per_cell: dict[str, int]


def load_settings(config: Mapping[str, Any]) -> Any:
    from ..recipe.sections import SpaceEvoSearchSettings

    if config.get("search") is not None:
        raise RecipeError("a recipe has either a `search:` section (the joint search over subnets) or a "
                          "`spaceevo:` section (SpaceEvo's search over spaces), not both", key="spaceevo",
                          given=["search", "spaceevo"], allowed="one of search, spaceevo")
    try:
        settings = SpaceEvoSearchSettings(**config["spaceevo"])
    except TypeError as error:
        raise RecipeError(f"invalid SpaceEvo search settings ({error})", key="spaceevo") from None
    if (settings.budgets_ms is None) == (settings.budget_percentiles is None):
        raise RecipeError("give exactly one of spaceevo.budgets_ms (ms) and spaceevo.budget_percentiles",
                          key="spaceevo", given=sorted(k for k in ("budgets_ms", "budget_percentiles")
                                                       if getattr(settings, k) is not None),
                          allowed=["budgets_ms", "budget_percentiles"])
    for key in ("budgets_ms", "budget_percentiles"):
        if getattr(settings, key) is not None and not getattr(settings, key):
            raise RecipeError("an empty list of budgets", key=f"spaceevo.{key}", given=[],
                              allowed="one or more budgets")
    bad = [q for q in settings.budget_percentiles or [] if not 0 < q < 100]
    if bad:
        raise RecipeError("a percentile is in (0, 100)", key="spaceevo.budget_percentiles", given=bad[0],
                          allowed="numbers in (0, 100)")
    if settings.sample_size > settings.population:
        raise RecipeError("the sample cannot exceed the population", key="spaceevo.sample_size",
                          given=settings.sample_size, allowed=f"at most spaceevo.population = {settings.population}")
    if not 0 < settings.t <= 1:
        raise RecipeError("t is a share of subnets", key="spaceevo.t", given=settings.t, allowed="a number in (0, 1]")
    return settings


# ------------------------------------------------------------------------------------ tables


def _require_file(path: Path, what: str) -> None:
    name, recipe, command = PRODUCERS[what]
    if not path.is_file():
        raise RecipeError(f"the {what} table {path} is missing: it is the {name} that `{command}` writes into its "
                          "run directory", key=f"spaceevo.{what}", given=str(path),
                          allowed=f"an existing {name}: run {recipe} first, or point spaceevo.{what} at its file")


def _read_csv(path: Path, what: str, columns: Sequence[str]) -> list[dict[str, str]]:
    name, recipe, _ = PRODUCERS[what]
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise RecipeError(f"not a {name} of {recipe} (it lacks the columns {missing})", key=f"spaceevo.{what}",
                              given=str(path), allowed=f"a CSV with the columns {', '.join(columns)}")
        return list(reader)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_latency_meta(path: Path, layout: Any) -> dict[str, Any]:
    """The latency table's sidecar (``{}`` when there is none), checked against ``layout``."""
    meta_path = path.with_name(path.name + ".meta.json")
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"the latency table's metadata is not JSON ({error})", key="spaceevo.latency",
                          given=str(meta_path)) from None
    if not isinstance(meta, dict):
        raise RecipeError("the latency table's metadata is not a mapping", key="spaceevo.latency", given=str(meta_path))
    expected = json.loads(json.dumps(dataclasses.asdict(layout)))
    recorded = meta.get("layout")
    if recorded is not None and recorded != expected:
        name = recorded.get("name") if isinstance(recorded, dict) else recorded
        raise RecipeError(f"the latency table was measured for another layout ({name!r})",
                          key="spaceevo.layout", given=layout.name,
                          allowed=f"the layout recorded in {meta_path.name}, or a table of this layout")
    return meta


def join_tables(latency_path: Path, losses_path: Path, layout: Any) -> JoinedTables:
    """Both tables read, checked row by row against ``layout``, joined on the sub-stage key, and
    checked to cover every window of every cell (module docstring)."""
    from ..hardware.spaceevo_latency import KEY_COLUMNS, substage_key
    from ..search.spaceevo import SpaceEvoTables
    from ..spaces.spaceevo_layout import stage_windows

    _require_file(latency_path, "latency")
    _require_file(losses_path, "losses")
    latency_rows = _read_csv(latency_path, "latency", (*KEY_COLUMNS, "latency_ms"))
    loss_rows = _read_csv(losses_path, "losses", (*KEY_COLUMNS, "loss"))
    # row checks with each file named (the other column filled in, so only this file's values count)
    SpaceEvoTables.from_rows(({**row, "loss": 0.0} for row in latency_rows), layout, source=str(latency_path))
    SpaceEvoTables.from_rows(({**row, "latency_ms": 0.0} for row in loss_rows), layout, source=str(losses_path))

    def keyed(rows: list[dict[str, str]], path: Path, what: str) -> dict[tuple, dict[str, str]]:
        out: dict[tuple, dict[str, str]] = {}
        for number, row in enumerate(rows):
            key = substage_key(row)
            if key in out:
                raise RecipeError(f"the {what} table has this sub-stage twice", source=str(path),
                                  key=f"row {number}", given=dict(zip(KEY_COLUMNS, key)),
                                  allowed="one row per (stage, block_type, width, depth, kernel, expand)")
            out[key] = row
        return out

    latency, losses = keyed(latency_rows, latency_path, "latency"), keyed(loss_rows, losses_path, "losses")
    joined = [{**dict(zip(KEY_COLUMNS, key)), "latency_ms": latency[key]["latency_ms"], "loss": losses[key]["loss"]}
              for key in latency if key in losses]
    tables = SpaceEvoTables.from_rows(joined, layout, source=f"{latency_path} joined with {losses_path}")

    def count(keys: Any, stage: int, block_type: str, widths: Sequence[int] | None = None) -> int:
        return sum(1 for k in keys if k[0] == stage and k[1] == block_type and (widths is None or k[2] in widths))

    for stage in range(layout.num_stages):
        for block_type in layout.block_types:
            for window in stage_windows(stage, layout):
                widths = layout.stages[stage].widths[window[0]:window[1]]
                cell = tables.cells.get((stage, block_type))
                if cell is not None and np.isin(cell.width, widths).any():
                    continue
                in_latency = count(latency, stage, block_type, widths)
                in_losses = count(losses, stage, block_type, widths)
                lacking = [f"{what} ({PRODUCERS[what][1]})" for what, n in (("latency", in_latency),
                                                                             ("losses", in_losses)) if n == 0]
                raise RecipeError(
                    "the tables do not cover the layout: no sub-stage of this cell and window is in both "
                    f"(latency table {in_latency} rows, losses table {in_losses}; "
                    + (f"missing from {' and '.join(lacking)})" if lacking else "none with the same key)"),
                    key=f"stage {stage}, block_type {block_type}, window {list(window)} (widths {list(widths)})",
                    given=f"{latency_path}, {losses_path}",
                    allowed="rows for every window of every (stage, block type) cell of the layout: run "
                    f"{PRODUCERS['latency'][1]} and {PRODUCERS['losses'][1]} over all cells, or search a "
                    "layout with fewer block types (spaceevo.layout)")
    per_cell = {f"{stage}/{block_type}": len(cell) for (stage, block_type), cell in sorted(tables.cells.items())}
    return JoinedTables(tables, len(latency_rows), len(loss_rows), len(joined), per_cell)


def percentile_budgets(tables: Any, percentiles: Sequence[float], fixed_latency_ms: float, seed: int) -> list[float]:
    """Latencies at ``percentiles`` of random subnets of random spaces (the speed benchmark's budgets)."""
    from ..search.spaceevo import sample_subnets
    from ..spaces.spaceevo_layout import random_space

    rng = np.random.default_rng([seed, 19])
    latency = np.concatenate([
        sample_subnets(tables, random_space(rng, tables.layout), rng, PERCENTILE_SUBNETS, fixed_latency_ms)[0]
        for _ in range(PERCENTILE_SPACES)])
    return [float(v) for v in np.percentile(latency, list(percentiles))]


# ------------------------------------------------------------------------------------ outputs


def _finite(value: float) -> float | None:
    """JSON has no NaN: a budget no subnet fits has no L and no T."""
    return value if math.isfinite(value) else None


def _budgets(entry: Any) -> list[dict[str, Any]]:
    return [{"budget_ms": b.budget_ms, "p": b.p, "L": _finite(b.loss), "T": _finite(b.latency_term),
             "contribution": _finite(b.contribution)} for b in entry.score.budgets]


def _stages(entry: Any, layout: Any) -> list[dict[str, Any]]:
    return [{"block_type": stage.block_type, "window": list(stage.window),
             "widths": list(layout.stages[i].widths[stage.window[0]:stage.window[1]])}
            for i, stage in enumerate(entry.space.stages)]


def _record(entry: Any, layout: Any, rank: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if rank is None else {"rank": rank}
    out.update({"space": entry.space.id, "score": _finite(entry.score.score), "index": entry.index,
                "origin": entry.origin, "parent": entry.parent, "stages": _stages(entry, layout),
                "budgets": _budgets(entry)})
    return out


def csv_columns(layout: Any, budgets: int) -> list[str]:
    columns = ["index", "origin", "parent", "space"]
    for i in range(layout.num_stages):
        columns += [f"stage{i}_block_type", f"stage{i}_window", f"stage{i}_widths"]
    for b in range(budgets):
        columns += [f"budget{b}_ms", f"p{b}", f"L{b}", f"T{b}", f"qt{b}"]
    return [*columns, "score"]


def write_spaces_csv(path: Path, history: Sequence[Any], layout: Any) -> Path:
    budgets = len(history[0].score.budgets) if history else 0
    with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(csv_columns(layout, budgets))
        for entry in history:
            row: list[Any] = [entry.index, entry.origin, entry.parent or "", entry.space.id]
            for stage in _stages(entry, layout):
                row += [stage["block_type"], f"{stage['window'][0]}:{stage['window'][1]}",
                        " ".join(str(w) for w in stage["widths"])]
            for b in entry.score.budgets:
                row += [repr(b.budget_ms), repr(b.p), repr(b.loss), repr(b.latency_term), repr(b.contribution)]
            writer.writerow([*row, repr(entry.score.score)])
    return path


def read_spaces_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``spaces.csv``, numbers parsed (``nan`` where a budget had no feasible subnet)."""
    text = {"origin", "parent", "space"}
    with Path(path).open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if key in text or key.endswith(("_block_type", "_window", "_widths")):
                parsed[key] = value
            elif key == "index":
                parsed[key] = int(value)
            else:
                parsed[key] = float(value)
        out.append(parsed)
    return out


def plot_evolution(path: Path, history: Sequence[Any], homogeneous: Sequence[Any], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = np.array([e.index for e in history])
    score = np.array([e.score.score for e in history])
    figure, axis = plt.subplots(figsize=(7.2, 4.8))
    axis.scatter(index, score, s=4, color="tab:blue", alpha=0.35, label="evaluated space", rasterized=True)
    axis.step(index, np.maximum.accumulate(score), where="post", color="tab:red", linewidth=1.4,
              label="best so far")
    colours = plt.get_cmap("tab10")
    for i, entry in enumerate(homogeneous):
        axis.axhline(entry.score.score, color=colours(i % 10), linestyle="--", linewidth=0.9,
                     label=f"homogeneous {entry.space.stages[0].block_type} ({entry.score.score:.3g})")
    children = [e.index for e in history if e.origin in ("block_type", "window")]
    if children:
        axis.axvline(children[0], color="gray", linestyle=":", linewidth=0.9, label="first mutated child")
    axis.set_xlabel("spaces evaluated (seeds, random fill, then two children per cycle)")
    axis.set_ylabel("Q-T score")
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=7)
    return save_png(figure, path)


# ------------------------------------------------------------------------------------ the stage


def fixed_parts_ms(meta: dict[str, Any], given: float | None) -> float:
    """What a subnet costs beyond its stages' rows (ONNX Runtime call overhead apart): ``given``,
    else the stem plus the head at the last stage's largest width as the profile timed them
    (``fixed_ms`` of the latency meta: an upper bound for subnets ending narrower), else 0."""
    if given is not None:
        return float(given)
    parts = meta.get("fixed_ms")
    if not parts:
        return 0.0
    heads = parts.get("head") or {}
    return float(parts["stem"]) + (float(heads[max(heads, key=int)]) if heads else 0.0)


def run(recipe: LoadedRecipe) -> Path:
    from ..search.spaceevo import QTSettings, evolve_spaces
    from ..spaces.spaceevo_space import layout_from_hparams
    from ..targets import check_same_target, resolve_target

    config = recipe.config
    settings = load_settings(config)
    try:
        layout = layout_from_hparams(settings.layout)
    except RecipeError as error:
        raise RecipeError(error.message, key="spaceevo.layout", given=settings.layout, allowed=error.allowed) from None
    target = resolve_target(settings.target, key="spaceevo.target").name
    latency_path, losses_path = Path(settings.latency), Path(settings.losses)
    _require_file(latency_path, "latency")
    _require_file(losses_path, "losses")
    meta = read_latency_meta(latency_path, layout)
    check_same_target({f"latency table {latency_path}": meta.get("target")}, target, settings.allow_mixed_targets,
                      key="spaceevo.target")
    joined = join_tables(latency_path, losses_path, layout)
    seed = int(config.get("seed", 0) if settings.seed is None else settings.seed)
    overhead = float(meta.get("overhead_ms") or 0.0)
    fixed_parts = fixed_parts_ms(meta, settings.fixed_latency_ms)
    fixed = fixed_parts + overhead
    if settings.budgets_ms is not None:
        budgets, budget_source = [float(b) for b in settings.budgets_ms], "spaceevo.budgets_ms"
    else:
        budgets = percentile_budgets(joined.tables, settings.budget_percentiles, fixed, seed)
        budget_source = (f"percentiles {list(settings.budget_percentiles)} of {PERCENTILE_SPACES} random spaces x "
                         f"{PERCENTILE_SUBNETS} random subnets")
    qt = QTSettings(budgets_ms=tuple(budgets), num_subnets=settings.num_subnets, top_k=settings.best_subnets,
                    t=settings.t, a=settings.a, fixed_latency_ms=fixed, seed=seed)
    run_dir = prepare_run_dir(recipe)

    with progress_bar("search (spaceevo)", settings.progress, fields=["spaces", "best {task.fields[best]}"]) as bar:
        task = bar.add_task("spaces", total=settings.evaluations, best="-")
        best = [-math.inf]

        def advance(entry: Any) -> None:
            best[0] = max(best[0], entry.score.score)
            bar.update(task, advance=1, best=f"{best[0]:.4g}")

        result = evolve_spaces(joined.tables, qt, population_size=settings.population,
                               sample_size=settings.sample_size, evaluations=settings.evaluations, seed=seed,
                               max_retries=settings.max_retries, progress=advance)

    history = result.history
    homogeneous = [e for e in history if e.origin == "homogeneous"]
    ranked = result.best(len(history))
    rank_of = {e.index: r + 1 for r, e in enumerate(ranked)}
    terms = [b.latency_term for e in history for b in e.score.budgets if b.p > 0]
    spaces_csv = write_spaces_csv(run_dir / SPACES_CSV, history, layout)
    png = plot_evolution(run_dir / EVOLUTION_PNG, history, homogeneous,
                         f"SpaceEvo: {len(history)} spaces, budgets {', '.join(f'{b:.3g}' for b in budgets)} ms")
    record = {
        "target": target, "seed": seed, "layout": layout.name,
        "settings": dataclasses.asdict(settings),
        "budgets_ms": budgets, "budget_source": budget_source,
        "fixed_latency_ms": fixed_parts, "fixed_latency_source": (
            "spaceevo.fixed_latency_ms" if settings.fixed_latency_ms is not None
            else "latency meta fixed_ms" if "fixed_ms" in meta else "none (0)"),
        "call_overhead_ms": overhead,
        # how far the latency rows can be trusted on this machine (the profile's self-validation)
        "latency_validation": meta.get("validation"),
        "qt": {"num_subnets": qt.num_subnets, "top_k": qt.top_k, "t": qt.t, "a": qt.a,
               "fixed_latency_ms": qt.fixed_latency_ms, "seed": qt.seed},
        "tables": {
            "latency": {"path": str(latency_path), "sha256": _sha256(latency_path), "rows": joined.latency_rows,
                        "meta": meta, "written_by": PRODUCERS["latency"][1]},
            "losses": {"path": str(losses_path), "sha256": _sha256(losses_path), "rows": joined.loss_rows,
                       "target": None, "written_by": PRODUCERS["losses"][1]},
            "joined_rows": joined.joined_rows, "rows_per_cell": joined.rows_per_cell,
        },
        "evolution": {"evaluations": len(history), "asked": result.budget, "exhausted": result.exhausted,
                      "dropped_duplicates": result.dropped_duplicates, "seconds": round(result.seconds, 3),
                      "origins": result.stats, "population": settings.population,
                      "sample_size": settings.sample_size},
        # whether the latency term matters: T over every (space, budget) with a feasible subnet
        "latency_term": {"max": max(terms) if terms else None, "mean": float(np.mean(terms)) if terms else None,
                         "infeasible_pairs": sum(b.p == 0 for e in history for b in e.score.budgets)},
        "best": [_record(e, layout, rank=r + 1) for r, e in enumerate(ranked[: settings.top_k])],
        "homogeneous": [{**_record(e, layout, rank=rank_of[e.index]), "block_type": e.space.stages[0].block_type}
                        for e in homogeneous],
        "files": {"spaces_csv": str(spaces_csv), "evolution_png": str(png)},
    }
    best_json = write_json(run_dir / BEST_JSON, record)
    top = ranked[0]
    print(f"search spaceevo: {len(history)} spaces in {result.seconds:.1f} s ({joined.joined_rows} joined sub-stage "
          f"rows; budgets {', '.join(f'{b:.4g}' for b in budgets)} ms); best Q-T {top.score.score:.4g}: {top.space.id}")
    for entry in homogeneous:
        print(f"  homogeneous {entry.space.stages[0].block_type}: Q-T {entry.score.score:.4g} "
              f"(rank {rank_of[entry.index]})")
    print(f"wrote {spaces_csv}, {png}, {best_json}")
    return run_dir
