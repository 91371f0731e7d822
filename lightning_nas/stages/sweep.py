"""``lightning-nas sweep``: a W&B sweep of the recipe's ``sweep:`` section, of any stage.

The definition's command runs the recipe's own verb (``fit``, ``search``, ``pipeline``, ...) with
flat dotted keys, which is exactly the override syntax; a pipeline's stage keys are addressed as
``STAGE/key`` (``ofa_supernet/task.lr``). Every swept parameter is validated first by loading the
recipe with a sample value for it.

``--start`` registers the definition with a W&B server and starts an agent. ``--local N`` runs N
trials here with W&B's own sweep engine (the ``sweeps`` package: random, grid and bayes from the
same definition), one after another in this process: each trial is a W&B run (offline without
credentials) in a group named after the sweep, with its own run directory under the sweep's.
The sweep's directory keeps the state (``trials.json``), so a rerun continues to N trials; a
failed trial is recorded as failed (its traceback in its ``error.txt``) and the sweep goes on.
At the end: ``trials.csv`` (every trial's parameters, metric, status and run directory), the best
trial's resolved recipe (``best_recipe.yaml``), ``parallel_coordinates.png`` and
``metric_vs_parameters.png``, also logged to W&B in a summary run of the group.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import random
import shutil
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..files import save_png, write_text
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import CONFIG_FILE
from .pipeline import load_with_stage_overrides, plan, split_stage_overrides
from .verbs import STAGE_VERBS, recipe_verb

STATE_FILE = "trials.json"
TABLE_FILE = "trials.csv"
BEST_RECIPE_FILE = "best_recipe.yaml"
PARALLEL_PNG = "parallel_coordinates.png"
METRIC_PNG = "metric_vs_parameters.png"
DEFINITION_FILE = "sweep.yaml"
ERROR_FILE = "error.txt"


def sample_value(spec: dict[str, Any]) -> Any:
    """A value a W&B parameter spec can produce, to validate the key it sets."""
    if "value" in spec:
        return spec["value"]
    if spec.get("values"):
        return spec["values"][0]
    if "min" in spec:
        return spec["min"]
    if "max" in spec:
        return spec["max"]
    raise RecipeError("a sweep parameter needs value, values, or min/max", given=spec,
                      allowed="{values: [...]}, {value: x}, {min: a, max: b, distribution: ...}")


def plain(value: Any) -> Any:
    """A number the engine returns as a numpy scalar, as a Python one."""
    return value.item() if hasattr(value, "item") else value


def _override_text(value: Any) -> str:
    return yaml.safe_dump(plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def parameter_overrides(parameters: Mapping[str, Any]) -> list[str]:
    return [f"{key}={_override_text(value)}" for key, value in parameters.items()]


def trial_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides a trial runs with: those of the ``sweep`` section itself only shape the sweep."""
    return [o for o in overrides if o.removeprefix("~").split("=", 1)[0].split(".", 1)[0] != "sweep"]


def _check_key(recipe: LoadedRecipe, overrides: Sequence[str], key: str, spec: dict[str, Any], smoke: bool) -> None:
    where = f"sweep.parameters.{key}"
    try:
        loaded = load_with_stage_overrides(recipe.path, [*overrides, *parameter_overrides({key: sample_value(spec)})],
                                           smoke=smoke)
        if split_stage_overrides([key + "=x"])[1]:
            plan(loaded)  # a stage key: load the stages to check it
    except RecipeError as error:
        raise RecipeError(f"this swept key does not fit the recipe: {error.render()}", key=where,
                          source=str(recipe.path)) from None


def sweep_definition(recipe: LoadedRecipe, overrides: Sequence[str] = (), smoke: bool = False) -> dict[str, Any]:
    config = recipe.config
    require_sections(config, ("sweep",), "sweep")
    settings = config["sweep"]
    for key, spec in settings["parameters"].items():
        _check_key(recipe, overrides, key, spec, smoke)
    command = ["${env}", "lightning-nas", recipe_verb(config), str(recipe.path), *(["--smoke"] if smoke else []),
               *trial_overrides(overrides), "${args_no_hyphens}"]
    definition: dict[str, Any] = {"method": settings["method"], "parameters": settings["parameters"],
                                  "command": command}
    for optional in ("metric", "name", "early_terminate", "run_cap"):
        if settings.get(optional) is not None:
            definition[optional] = settings[optional]
    return definition


def sweep_name(recipe: LoadedRecipe) -> str:
    return recipe.config["sweep"].get("name") or f"{recipe.config['name']}-sweep"


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


# --- the engine --------------------------------------------------------------------------------
def suggest(definition: Mapping[str, Any], trials: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any] | None:
    """The next trial's parameters from W&B's sweep engine, or None when a grid is exhausted.

    The engine draws from Python's and numpy's global generators: they are seeded from the sweep's
    seed and the number of trials so far (and restored), so a sweep is repeatable.
    """
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sweeps 0.3 uses pydantic-1 config names
        try:
            import sweeps
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("--local runs W&B's sweep engine: pip install -e '.[sweep]' && "
                                      "pip install --no-deps sweeps==0.3.0") from error

    metric = (definition.get("metric") or {}).get("name")
    runs = []
    for trial in trials:
        value = trial.get("metric")
        measured = {} if value is None or metric is None else {metric: value}
        runs.append(sweeps.SweepRun(
            name=trial["name"], config={k: {"value": v} for k, v in trial["parameters"].items()},
            state=sweeps.RunState.finished if trial["status"] == "finished" else sweeps.RunState.failed,
            summary_metrics=measured, history=[measured] if measured else []))
    engine = {k: definition[k] for k in ("method", "metric", "parameters") if definition.get(k) is not None}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        random.seed(f"sweep-{seed}-{len(trials)}")
        np.random.seed((seed * 1_000_003 + len(trials)) % 2**32)
        run = sweeps.next_run(engine, runs)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return None if run is None else {k: plain(v["value"]) for k, v in run.config.items()}


# --- reading a trial's metric ------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, child in items:
        flat.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_from_files(run_dir: Path, name: str) -> float | None:
    """The last value of ``name`` in a ``metrics.csv`` or a JSON file under ``run_dir`` (the most
    recently written one that has it). ``STAGE/name`` looks inside a pipeline stage's directory."""
    first, _, rest = name.partition("/")
    if rest and (run_dir / first).is_dir():
        run_dir, name = run_dir / first, rest
    found: list[tuple[float, float]] = []
    for path in run_dir.rglob("*"):
        if "wandb" in path.relative_to(run_dir).parts or not path.is_file():
            continue
        value = None
        if path.name == "metrics.csv":
            with path.open(newline="", encoding="utf-8") as stream:
                rows = [row for row in csv.DictReader(stream) if _number(row.get(name)) is not None]
            value = _number(rows[-1][name]) if rows else None
        elif path.suffix == ".json" and path.stat().st_size < 10_000_000:
            try:
                value = _number(_flatten(json.loads(path.read_text(encoding="utf-8"))).get(name))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        if value is not None:
            found.append((path.stat().st_mtime, value))
    return max(found)[1] if found else None


def trial_metric(run: Any, run_dir: Path, name: str) -> float:
    """The metric from the trial's W&B summary (what its Lightning loggers logged last), else its files."""
    value = _number(dict(run.summary).get(name)) if run is not None else None
    if value is None:
        value = metric_from_files(run_dir, name)
    if value is None:
        raise RuntimeError(f"the trial logged no metric {name!r} (W&B summary, metrics.csv or *.json under {run_dir})")
    return value


# --- one trial ---------------------------------------------------------------------------------
def run_trial(recipe: LoadedRecipe, overrides: Sequence[str], smoke: bool, trial: dict[str, Any], group: str,
              metric: str) -> None:
    """Run one trial in this process as a W&B run; records its status, metric and time in ``trial``."""
    import wandb

    from ..loggers import wandb_offline

    trial_dir = Path(trial["run_dir"])
    trial_dir.mkdir(parents=True, exist_ok=True)
    settings = recipe.config.get("wandb") or {}
    run = wandb.init(dir=str(trial_dir), project=settings.get("project", "lightning-nas"),
                     entity=settings.get("entity"), group=group, job_type="trial", name=f"{group}-{trial['name']}",
                     tags=settings.get("tags") or None, config=trial["parameters"],
                     mode="offline" if wandb_offline(settings) else "online", reinit="finish_previous")
    trial["wandb_id"] = run.id
    started = time.perf_counter()
    exit_code = 1
    try:
        loaded = load_with_stage_overrides(
            recipe.path, [*trial_overrides(overrides), *parameter_overrides(trial["parameters"]), f"run_dir={trial_dir}"],
            smoke=smoke)
        verb = recipe_verb(loaded.config)
        if verb == "fit":  # Lightning logs into the trial's run (WandbLogger reuses the open run)
            loggers = loaded.config.get("logger")
            loggers = [] if loggers is None else [loggers] if isinstance(loggers, str) else list(loggers)
            loaded.config["logger"] = [*loggers, "wandb"] if "wandb" not in loggers else loggers
        importlib.import_module(STAGE_VERBS[verb][0]).run(loaded)
        trial["metric"] = trial_metric(run, trial_dir, metric)
        run.summary[metric] = trial["metric"]
        trial["status"], trial["error"] = "finished", None
        exit_code = 0
    except Exception as error:  # a failed trial is recorded, and the sweep goes on
        (trial_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        trial["status"], trial["metric"] = "failed", None
        trial["error"] = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        print(f"{trial['name']} failed: {trial['error']} (see {trial_dir / ERROR_FILE})", flush=True)
    finally:
        trial["seconds"] = round(time.perf_counter() - started, 2)
        run.finish(exit_code=exit_code)


# --- state, table, plots -----------------------------------------------------------------------
def definition_digest(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()


def load_state(sweep_dir: Path, definition: Mapping[str, Any]) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    digest = definition_digest(definition)
    if not path.is_file():
        return {"definition_sha256": digest, "trials": []}
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("definition_sha256") != digest:
        raise RecipeError("this directory holds another sweep (other parameters, recipe or overrides)",
                          key="sweep.run_dir", given=str(sweep_dir),
                          allowed="the same sweep to continue it, or another sweep.name / sweep.run_dir")
    return state


def save_state(sweep_dir: Path, state: Mapping[str, Any]) -> None:
    _write_text(sweep_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def best_trial(trials: Sequence[Mapping[str, Any]], goal: str) -> Mapping[str, Any] | None:
    finished = [t for t in trials if t["status"] == "finished" and t.get("metric") is not None]
    if not finished:
        return None
    return (max if goal == "maximize" else min)(finished, key=lambda t: t["metric"])


def table_rows(trials: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str) -> tuple[list[str], list[list]]:
    columns = ["trial", "status", metric, *keys, "run_dir", "seconds", "error"]
    rows = [[t["name"], t["status"], t.get("metric"), *(t["parameters"].get(k) for k in keys), t["run_dir"],
             t.get("seconds"), t.get("error")] for t in trials]
    return columns, rows


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in row]
                         for row in rows)
    partial.replace(path)


def _axis(values: Sequence[Any], log: bool) -> tuple[list[float], list[float], list[str]]:
    """Positions of the values on an axis, with tick positions and labels (categories: evenly)."""
    numbers = [_number(v) if not isinstance(v, bool) else None for v in values]
    if all(n is not None for n in numbers) and (not log or all(n > 0 for n in numbers)):
        positions = [math.log10(n) if log else n for n in numbers]  # type: ignore[arg-type]
        low, high = min(positions), max(positions)
        ticks = [low, high] if high > low else [low]
        labels = [f"{10 ** t if log else t:.4g}" for t in ticks]
        return positions, ticks, labels
    categories = sorted({json.dumps(v) for v in values})
    positions = [float(categories.index(json.dumps(v))) for v in values]
    return positions, [float(i) for i in range(len(categories))], [json.loads(c).__str__() for c in categories]


def plot_trials(sweep_dir: Path, trials: Sequence[Mapping[str, Any]], definition: Mapping[str, Any],
                metric: str) -> list[Path]:
    """The parallel-coordinates and metric-vs-parameter figures of the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [t for t in trials if t["status"] == "finished" and t.get("metric") is not None]
    if not finished:
        return []
    keys = list(definition["parameters"])
    logs = {k: "log" in str(definition["parameters"][k].get("distribution", "")) for k in keys}
    values = [t["metric"] for t in finished]
    axes = {k: _axis([t["parameters"][k] for t in finished], logs[k]) for k in keys}
    axes[metric] = _axis(values, False)
    colour = plt.get_cmap("viridis")
    low, high = min(values), max(values)
    shade = [colour(0.5 if high == low else (v - low) / (high - low)) for v in values]

    paths = []
    figure, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(axes)), 4.2))
    names = list(axes)
    scaled = {}
    for name in names:
        positions, ticks, labels = axes[name]
        span_low, span_high = min(positions + ticks), max(positions + ticks)
        width = span_high - span_low or 1.0
        scaled[name] = ([(p - span_low) / width for p in positions], [(t - span_low) / width for t in ticks], labels)
    for i in range(len(finished)):
        ax.plot(range(len(names)), [scaled[n][0][i] for n in names], color=shade[i], alpha=0.85, linewidth=1.6)
    for x, name in enumerate(names):
        ax.axvline(x, color="0.3", linewidth=0.8)
        for tick, label in zip(scaled[name][1], scaled[name][2]):
            ax.text(x + 0.03, tick, label, fontsize=7, va="center")
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) - 0.6)
    ax.set_title(f"{len(finished)} finished trials, coloured by {metric}")
    figure.colorbar(plt.cm.ScalarMappable(cmap=colour, norm=plt.Normalize(low, high)), ax=ax, label=metric)
    paths.append(save_png(figure, sweep_dir / PARALLEL_PNG, dpi=110))

    figure, grid = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(grid[0], keys):
        positions, ticks, labels = axes[key]
        raw = [_number(t["parameters"][key]) for t in finished]
        numeric = all(r is not None for r in raw)
        if logs[key] and numeric and all(r > 0 for r in raw):  # type: ignore[operator]
            ax.scatter(raw, values, c=shade, edgecolors="0.2")
            ax.set_xscale("log")
        else:
            ax.scatter(positions, values, c=shade, edgecolors="0.2")
            if not numeric:
                ax.set_xticks(ticks, labels)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{metric} against each swept parameter")
    paths.append(save_png(figure, sweep_dir / METRIC_PNG, dpi=110))
    return paths


def log_summary(recipe: LoadedRecipe, sweep_dir: Path, group: str, definition: Mapping[str, Any],
                columns: Sequence[str], rows: Sequence[Sequence[Any]], figures: Sequence[Path],
                best: Mapping[str, Any] | None, metric: str) -> None:
    """The table and the figures as a W&B run of the sweep's group."""
    import wandb

    from ..loggers import wandb_offline

    settings = recipe.config.get("wandb") or {}
    run = wandb.init(dir=str(sweep_dir), project=settings.get("project", "lightning-nas"),
                     entity=settings.get("entity"), group=group, job_type="sweep-summary", name=f"{group}-summary",
                     config={"definition": dict(definition)}, mode="offline" if wandb_offline(settings) else "online",
                     reinit="finish_previous")
    cells = [[json.dumps(v) if isinstance(v, (list, dict)) else v for v in row] for row in rows]
    logged: dict[str, Any] = {"sweep/trials": wandb.Table(columns=list(columns), data=cells)}
    for path in figures:
        logged[f"sweep/{path.stem}"] = wandb.Image(str(path))
    run.log(logged)
    if best is not None:
        run.summary.update({f"best/{metric}": best["metric"], "best/trial": best["name"],
                            **{f"best/{k}": v for k, v in best["parameters"].items()}})
    run.finish()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], best: Mapping[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*[c for c in columns if c != "error"], title="sweep trials")
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
                 for c, v in zip(columns, row) if c != "error"]
        table.add_row(*cells, style="bold" if best is not None and row[0] == best["name"] else None)
    Console().print(table)


def run_local(recipe: LoadedRecipe, overrides: Sequence[str], trials_wanted: int, smoke: bool = False,
              out: str | None = None) -> Path:
    """Run the sweep here until it has ``trials_wanted`` trials (finished or failed)."""
    settings = recipe.config["sweep"]
    metric_spec = settings.get("metric") or {}
    if not metric_spec.get("name"):
        raise RecipeError("a local sweep needs the metric it compares trials by", key="sweep.metric",
                          allowed="{name: val/acc, goal: maximize}")
    if trials_wanted < 1:
        raise RecipeError("--local needs at least one trial", given=trials_wanted)
    definition = sweep_definition(recipe, overrides, smoke)
    metric, goal = metric_spec["name"], metric_spec.get("goal", "minimize")
    group = sweep_name(recipe)
    sweep_dir = Path(out or settings.get("run_dir") or Path("runs") / "sweeps" / group)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(sweep_dir, definition)
    _write_text(sweep_dir / DEFINITION_FILE, yaml.safe_dump(definition, sort_keys=False))
    trials: list[dict[str, Any]] = state["trials"]
    limit = min(trials_wanted, settings.get("run_cap") or trials_wanted)
    done = sum(t["status"] in ("finished", "failed") for t in trials)
    print(f"sweep {group} in {sweep_dir}: {done} of {limit} trials done", flush=True)
    while sum(t["status"] in ("finished", "failed") for t in trials) < limit:
        # a trial interrupted before (still 'running') is rerun with its parameters, in its directory
        trial = next((t for t in trials if t["status"] == "running"), None)
        if trial is None:
            parameters = suggest(definition, trials, int(recipe.config.get("seed", 0)))
            if parameters is None:
                print("the grid is exhausted", flush=True)
                break
            name = f"trial-{len(trials):03d}"
            trial = {"name": name, "parameters": parameters, "status": "running", "metric": None,
                     "run_dir": str(sweep_dir / name), "seconds": None, "error": None}
            trials.append(trial)
        save_state(sweep_dir, state)
        print(f"{trial['name']}: {', '.join(parameter_overrides(trial['parameters']))}", flush=True)
        run_trial(recipe, overrides, smoke, trial, group, metric)
        save_state(sweep_dir, state)

    keys = list(definition["parameters"])
    columns, rows = table_rows(trials, keys, metric)
    write_table(sweep_dir / TABLE_FILE, columns, rows)
    best = best_trial(trials, goal)
    if best is not None:
        resolved = Path(best["run_dir"]) / CONFIG_FILE
        if resolved.is_file():
            shutil.copyfile(resolved, sweep_dir / f".{BEST_RECIPE_FILE}.partial")
            (sweep_dir / f".{BEST_RECIPE_FILE}.partial").replace(sweep_dir / BEST_RECIPE_FILE)
    figures = plot_trials(sweep_dir, trials, definition, metric)
    log_summary(recipe, sweep_dir, group, definition, columns, rows, figures, best, metric)
    print_table(columns, rows, best)
    if best is not None:
        print(f"best: {best['name']} {metric}={best['metric']:.6g} -> {sweep_dir / BEST_RECIPE_FILE}")
    return sweep_dir


def run(recipe: LoadedRecipe, overrides: Sequence[str] = (), out: str | None = None, start: bool = False,
        count: int | None = None, local: int | None = None, smoke: bool = False) -> Path:
    if local is not None:
        return run_local(recipe, overrides, local, smoke=smoke, out=out)
    definition = sweep_definition(recipe, overrides, smoke)
    path = Path(out) if out else Path(recipe.config["run_dir"]) / DEFINITION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(definition, sort_keys=False))
    print(f"sweep definition: {path}")
    if start:
        import wandb

        settings = recipe.config.get("wandb") or {}
        sweep_id = wandb.sweep(definition, project=settings.get("project", "lightning-nas"),
                               entity=settings.get("entity"))
        print(f"sweep id: {sweep_id}; starting an agent")
        wandb.agent(sweep_id, count=count)
    return path
