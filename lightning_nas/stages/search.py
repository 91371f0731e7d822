"""``lightning-nas search``: joint architecture / channel-pruning / quantization search.

Reads the recipe's ``search:`` section (:class:`~lightning_nas.recipe.search_settings.SearchSettings`),
scores candidates with the accuracy predictor and the cost models under hard constraints, and
writes into ``<run_dir>/search/``:

* ``topk.json``: the ``top_k`` best distinct feasible candidates (config, policy, predicted
  accuracy, every cost) and a summary of the run (strategy, seed, budget, candidates/s);
* ``pareto.csv``: every evaluated candidate (generation, origin, accuracy, every cost, feasible,
  on the front, config and policy as JSON), the front being the feasible candidates that no other
  feasible one beats on both accuracy and ``pareto_metric``. The APQ evolution rejects infeasible
  draws before scoring them (``rejected`` in ``topk.json`` counts them), so its rows are all
  feasible; NNI's own strategies score every trial, infeasible ones included;
* ``pareto.png``: accuracy against ``pareto_metric``, the front highlighted;
* ``nni/``: NNI's experiment directory (config, checkpoint, ``experiment.log``);

and, with the ``wandb`` logger, a top-k table, a front table with a scatter plot and the image.

Every strategy, ``apq_evolution`` included, is an NNI strategy run by
:class:`~lightning_nas.search.nni_engine.BatchedExecutionEngine`, which scores up to
``concurrency`` models in flight as one batch.

A recipe with a ``spaceevo:`` section instead runs SpaceEvo's search over spaces
(:mod:`lightning_nas.stages.spaceevo_search`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing, save_png, write_text
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import build_loggers, prepare_run_dir

SEARCH_DIR = "search"
TOPK_FILE = "topk.json"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
NNI_DIR = "nni"


def load_settings(config: Mapping[str, Any]) -> Any:
    from ..recipe.search_settings import SearchSettings

    require_sections(config, ("search",), "search")
    try:
        settings = SearchSettings(**config["search"])
    except TypeError as error:
        raise RecipeError(f"invalid search settings ({error})", key="search") from None
    for name in ("parents", "mutations"):
        if getattr(settings, name) > settings.population:
            raise RecipeError(f"{name} cannot exceed the population", key=f"search.{name}",
                              given=getattr(settings, name), allowed=f"at most search.population = {settings.population}")
    return settings


def build_cost_models(specs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{name: model}`` from recipe specs; a second model of one kind is named ``<kind>_2``."""
    from ..hardware.latency_table import LatencyTableError
    from ..registry import COST_MODELS

    models: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        base = str(spec.get("name"))
        name, n = base, 2
        while name in models:
            name, n = f"{base}_{n}", n + 1
        try:
            models[name] = COST_MODELS.build(spec)
        except LatencyTableError as error:
            raise RecipeError(str(error), key=f"search.cost_models.{i}.table", given=spec.get("table")) from None
    return models


def build_scorer(settings: Any) -> Any:
    """Joint space, predictor, cost models and constraints of the settings."""
    from ..predictors.accuracy import load_predictor
    from ..registry import SPACES
    from ..search.joint_space import JointSpace
    from ..search.scoring import Scorer
    from ..spaces.quant_policy import QuantPolicySpace

    space = SPACES.build(settings.space)  # validated with the recipe
    policy_space = None
    if settings.policy_bits is not None:
        try:
            policy_space = QuantPolicySpace(bit_choices=list(settings.policy_bits), fixed_bits=settings.fixed_bits)
        except ValueError as error:  # the policy space's check of exactly these two settings
            raise RecipeError(str(error), key="search.policy_bits", given=list(settings.policy_bits)) from None
    joint = JointSpace(space, policy_space)
    predictor = load_predictor(settings.predictor, key="search.predictor")
    models = build_cost_models(list(settings.cost_models))
    from ..predictors.accuracy import predictor_target
    from ..targets import check_same_target, resolve_target

    target = resolve_target(settings.target, key="search.target").name
    found = {f"predictor {settings.predictor}": predictor_target(settings.predictor, key="search.predictor")}
    found.update({f"cost model {name}": getattr(model, "target", None) for name, model in models.items()})
    check_same_target(found, target, settings.allow_mixed_targets, key="search.target")
    return Scorer(joint, predictor, models, settings.constraints, batch_size=settings.batch_size)


def run_search(settings: Any, scorer: Any, run_dir: Path, seed: int) -> tuple[Any, dict[str, Any]]:
    """Run the chosen strategy (every one is an NNI strategy, run through the batched engine);
    returns the history and a summary of the run."""
    from ..search.nni_strategies import NNISearch
    from ..search.scoring import InfeasibleConstraintsError

    summary: dict[str, Any] = {"strategy": settings.strategy, "seed": seed}
    options = _strategy_options(settings)
    if settings.concurrency < 1:
        raise RecipeError("must be at least 1", key="search.concurrency", given=settings.concurrency)
    with progress_bar(f"search ({settings.strategy})", settings.progress, fields=["cand"]) as bar:
        task = bar.add_task("search", total=settings.evaluations)
        try:
            search = NNISearch(
                scorer.joint, scorer, settings.strategy, settings.evaluations, run_dir / SEARCH_DIR / NNI_DIR,
                seed=seed, options=options, progress=lambda scored: bar.advance(task, scored),
                concurrency=settings.concurrency)
            started = time.perf_counter()  # after NNI's import (seconds), which is not the search's speed
            history = search.run()
        except InfeasibleConstraintsError as error:
            raise RecipeError(str(error), key="search.constraints", given=dict(settings.constraints)) from None
    seconds = time.perf_counter() - started
    summary.update(nni_experiment_dir=str(run_dir / SEARCH_DIR / NNI_DIR / str(search.experiment_id)),
                   strategy_options=options, engine="batched", concurrency=search.concurrency)
    if search.evolution is not None:
        stats = search.evolution.stats
        summary.update(generations=stats["generations"], rejected=stats["rejected"],
                       empty_slots=stats["empty_slots"],
                       selected_parents_by_origin=_total_origins(stats["selected"]))
    summary.update(evaluations=len(history), seconds=round(seconds, 3),
                   candidates_per_second=round(len(history) / max(seconds, 1e-9), 1),
                   cost_evaluations=scorer.cost_evaluations,
                   feasible=int(history.scores.feasible.sum()))
    return history, summary


def _strategy_options(settings: Any) -> dict[str, Any]:
    """Strategy arguments: the recipe's evolution settings where the strategy has them, then the
    recipe's ``strategy_options``."""
    defaults: dict[str, Any] = {}
    if settings.strategy == "apq_evolution":
        defaults = {"population_size": settings.population, "parents": settings.parents,
                    "mutations": settings.mutations, "mutation_prob": settings.mutation_prob,
                    "resolution_prob": settings.resolution_prob, "policy_prob": settings.policy_mutation_prob,
                    "max_tries": settings.max_tries}
    elif settings.strategy == "regularized_evolution":
        defaults = {"population_size": settings.population, "sample_size": settings.parents,
                    "mutation_prob": settings.mutation_prob}
    return {**defaults, **dict(settings.strategy_options)}


def _total_origins(selected: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for generation in selected:
        for origin, count in generation.items():
            total[origin] = total.get(origin, 0) + count
    return total


# --------------------------------------------------------------------------------------- outputs


def pareto_metric(settings: Any, scorer: Any) -> str | None:
    if settings.pareto_metric is not None:
        if settings.pareto_metric not in scorer.metrics:
            raise RecipeError("no cost model reports this metric", key="search.pareto_metric",
                              given=settings.pareto_metric, allowed=scorer.metrics)
        return settings.pareto_metric
    if scorer.constraints:
        return next(iter(scorer.constraints))
    return scorer.metrics[0] if scorer.metrics else None


def write_outputs(history: Any, scorer: Any, summary: dict[str, Any], out_dir: Path, top_k: int,
                  metric: str | None) -> dict[str, Path]:
    """topk.json, pareto.csv and pareto.png; returns their paths."""
    from ..search.scoring import pareto_mask

    out_dir.mkdir(parents=True, exist_ok=True)
    scores = history.scores
    if metric is not None:
        front = pareto_mask(scores.accuracy, scores.costs[metric], scores.feasible)
    else:  # no cost model: the "front" is the best candidate
        front = np.zeros(len(scores), dtype=bool)
        if scores.feasible.any():
            front[history.top_k(1)[0]] = True
    generation, origins = history.generation, history.origin

    def row(i: int) -> dict[str, Any]:
        candidate = history.candidate(i)
        return {"config": candidate.config, "policy": candidate.policy,
                "accuracy": float(scores.accuracy[i]),
                "costs": {m: float(scores.costs[m][i]) for m in scorer.metrics},
                "generation": int(generation[i]), "origin": origins[i], "index": int(i)}

    top = [{"rank": r + 1, **row(i)} for r, i in enumerate(history.top_k(top_k))]
    topk_path = out_dir / TOPK_FILE
    write_text(topk_path, json.dumps({
        **summary, "constraints": scorer.constraints, "metrics": scorer.metrics, "pareto_metric": metric,
        "front_size": int(front.sum()), "topk": top}, indent=2))

    csv_path = out_dir / PARETO_CSV
    with replacing(csv_path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "generation", "origin", "accuracy", *scorer.metrics, "feasible", "on_front",
                         "config", "policy"])
        vectors = history.vectors
        for i in range(len(scores)):
            candidate = history.joint.decode_vector(vectors[i].tolist())
            writer.writerow([i, int(generation[i]), origins[i], f"{scores.accuracy[i]:.6g}",
                             *(f"{scores.costs[m][i]:.6g}" for m in scorer.metrics), int(scores.feasible[i]),
                             int(front[i]), json.dumps(candidate.config, separators=(",", ":")),
                             json.dumps(candidate.policy, separators=(",", ":"))])
    png_path = out_dir / PARETO_PNG
    _plot(png_path, scores, front, metric, scorer.constraints.get(metric) if metric else None, summary)
    return {"topk": topk_path, "pareto_csv": csv_path, "pareto_png": png_path, "front": front, "top": top}


def _plot(path: Path, scores: Any, front: np.ndarray, metric: str | None, limit: float | None,
          summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = scores.costs[metric] if metric is not None else np.arange(len(scores), dtype=np.float64)
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    infeasible = ~scores.feasible
    if infeasible.any():
        axis.scatter(x[infeasible], scores.accuracy[infeasible], s=4, color="lightgray", label="infeasible",
                     rasterized=True)
    feasible = scores.feasible & ~front
    if feasible.any():
        axis.scatter(x[feasible], scores.accuracy[feasible], s=4, color="tab:blue", alpha=0.4, label="feasible",
                     rasterized=True)
    if front.any():
        order = np.argsort(x[front])
        axis.plot(x[front][order], scores.accuracy[front][order], "-o", color="tab:red", markersize=4,
                  linewidth=1.2, label="Pareto front")
    if limit is not None:
        axis.axvline(limit, color="black", linestyle="--", linewidth=1, label=f"{metric} limit")
    axis.set_xlabel(metric or "evaluation")
    axis.set_ylabel("predicted top-1 (%)")
    axis.set_title(f"{summary.get('strategy')}: {len(scores)} candidates, {int(front.sum())} on the front")
    axis.legend(loc="lower right", fontsize=8)
    save_png(figure, path)


def log_results(config: Mapping[str, Any], run_dir: Path, outputs: dict[str, Any], history: Any, scorer: Any,
                summary: dict[str, Any], metric: str | None) -> None:
    """Summary metrics to every logger; tables and plots to W&B."""
    loggers = build_loggers(config, run_dir)
    if not loggers:
        return
    scores = history.scores
    best = outputs["top"][0] if outputs["top"] else None
    metrics = {"search/candidates_per_second": summary["candidates_per_second"],
               "search/evaluations": summary["evaluations"], "search/feasible": summary["feasible"]}
    if best is not None:
        metrics["search/best_accuracy"] = best["accuracy"]
        metrics.update({f"search/best_{m}": v for m, v in best["costs"].items()})
    columns = ["rank", "accuracy", *scorer.metrics, "config", "policy"]
    rows = [[t["rank"], t["accuracy"], *(t["costs"][m] for m in scorer.metrics), json.dumps(t["config"]),
             json.dumps(t["policy"])] for t in outputs["top"]]
    front = np.flatnonzero(outputs["front"])
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.log_table(key="search/topk", columns=columns, data=rows)
            logger.log_image(key="search/pareto", images=[str(outputs["pareto_png"])])
            if metric is not None and front.size:
                table = wandb.Table(columns=[metric, "accuracy"],
                                    data=[[float(scores.costs[metric][i]), float(scores.accuracy[i])] for i in front])
                logger.experiment.log({"search/front": wandb.plot.scatter(table, metric, "accuracy",
                                                                          title="Pareto front")})
        logger.save()
        logger.finalize("success")


def run(recipe: LoadedRecipe) -> Path:
    config = recipe.config
    if config.get("spaceevo") is not None:  # SpaceEvo's search over spaces, not over subnets
        from .spaceevo_search import run as run_spaceevo

        return run_spaceevo(recipe)
    settings = load_settings(config)
    run_dir = prepare_run_dir(recipe)
    seed = int(config.get("seed", 0) if settings.seed is None else settings.seed)
    scorer = build_scorer(settings)
    metric = pareto_metric(settings, scorer)
    history, summary = run_search(settings, scorer, run_dir, seed)
    summary["settings"] = {k: v for k, v in dataclasses.asdict(settings).items() if k != "cost_models"}
    from ..targets import resolve_target

    summary["target"] = resolve_target(settings.target, key="search.target").name  # read by QAT of a candidate
    # how well each measured latency table predicted whole subnets (lightning-nas profile's check)
    validation = {name: getattr(model, "validation", None) for name, model in scorer.cost_models.items()}
    summary["cost_model_validation"] = {name: v for name, v in validation.items() if v is not None}
    outputs = write_outputs(history, scorer, summary, run_dir / SEARCH_DIR, settings.top_k, metric)
    log_results(config, run_dir, outputs, history, scorer, summary, metric)
    best = outputs["top"][0] if outputs["top"] else None
    line = (f"search {settings.strategy}: {summary['evaluations']} candidates in {summary['seconds']:.1f} s "
            f"({summary['candidates_per_second']:.0f} candidates/s), {summary['feasible']} feasible")
    if best is not None:
        costs = ", ".join(f"{m}={v:.4g}" for m, v in best["costs"].items())
        line += f"; best predicted accuracy {best['accuracy']:.2f} ({costs})"
    print(line)
    print(f"wrote {outputs['topk']}, {outputs['pareto_csv']}, {outputs['pareto_png']}")
    for name, per_precision in summary["cost_model_validation"].items():
        for precision, figures in per_precision.items():
            correction = figures.get("correction") if figures is not None else None
            if correction is not None:  # a learned correction of the table's sum (lightning-nas profile)
                print(f"cost model {name} ({precision}) {'applies' if correction['applied'] else 'does not apply'} "
                      f"its table's learned correction (held-out Spearman: table sum "
                      f"{correction['raw'].get('spearman')}, corrected {correction['corrected'].get('spearman')})")
            if figures is None:
                print(f"cost model {name} ({precision}): its latency table was not validated on whole subnets")
            elif not figures.get("passed", True):
                print(f"WARNING: cost model {name} ({precision}): its latency table failed validation "
                      f"(Spearman {figures.get('spearman')}, median |error| {figures.get('median_abs_pct_error')} %)")
    return run_dir
