"""``lightning-nas allocate``: per-layer bits by an integer program for each proxy, checked by real PTQ.

For every budget (a parameter-weighted mean weight bit width, turned into bytes of the searchable
layers' weights, or into the BitOps of that uniform width) and every proxy, the same integer program
(:func:`~lightning_nas.search.bit_allocation.ilp_allocation`) picks the bits maximising the proxy
within the budget; ``emq`` is the program an ``emq`` run found, the others are hand-made
(:data:`~lightning_nas.spaces.emq_programs.HAND_MADE`). Baselines: the largest uniform bit width
within the budget, and ``random_configs`` random feasible configurations (the best of them by real
top-1, and their mean). Every configuration is quantized post-training exactly as the benchmark
did (the settings are read from its ``stats.npz``) and scored on the data module's test images.
Evaluations are kept in ``<run_dir>/allocation.sqlite`` keyed by the configuration, so a killed
run resumes. Writes ``allocation.csv``, ``allocation.json`` and ``allocation.png``.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing, save_png, write_json
from ..predictors.pair_store import Pair, PairStore, file_hash
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir, seed_everything
from .mqbench import (
    KIND,
    PTQSettings,
    build_evaluator,
    held_out,
    input_resolution,
    load_network,
    log_summary,
    ptq_id,
    test_batches,
)

STORE_FILE = "allocation.sqlite"


def proxy_gain(name: str, stats: Any, program_path: str | None) -> np.ndarray:
    """The proxy's table, oriented so that higher is predicted better."""
    from ..spaces.emq_programs import HAND_MADE, Program, hand_made_table, program_table

    if name == "emq":
        if program_path is None:
            raise RecipeError("the proxy emq needs the program an emq run found", key="allocate.program",
                              allowed="a best_program.json written by `lightning-nas emq`")
        try:
            program = Program.from_dict(json.loads(Path(program_path).read_text(encoding="utf-8"))["program"])
        except (KeyError, TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
            raise RecipeError(f"not a program written by `lightning-nas emq` ({error})", key="allocate.program",
                              given=program_path) from None
        return program_table(program, stats)
    if name not in HAND_MADE:
        raise RecipeError("unknown proxy", key="allocate.proxies", given=name, allowed=["emq", *HAND_MADE])
    return hand_made_table(name, stats)


def budget_limit(stats: Any, metric: str, mean_bits: float) -> float:
    """The cost of every searchable layer at ``mean_bits`` (the parameter-weighted mean for size)."""
    if metric == "size":
        return float(stats.scalars["params"].sum() * mean_bits / 8.0)
    return float(stats.scalars["macs"].sum() * mean_bits * stats.activation_bits)


def config_key(ptq: PTQSettings, bits: list[int]) -> str:
    return f"{ptq.checkpoint_hash}:{KIND}:alloc:{'-'.join(map(str, bits))}:{ptq_id(ptq)}"


def _plot(path: Path, rows: list[dict[str, Any]], budgets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["budget_bits"], r["top1"]) for r in rows if r["method"] == method]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, "o-", label=method, markersize=4)
    axis.set_xticks(budgets)
    axis.set_xlabel("budget (parameter-weighted mean weight bits)")
    axis.set_ylabel("top-1 after PTQ (%)")
    axis.legend(fontsize=8)
    save_png(figure, path)


def run(recipe: LoadedRecipe) -> Path:
    from ..recipe.sections import AllocateSettings
    from ..registry import DATA
    from ..search.bit_allocation import ilp_allocation, random_feasible
    from ..spaces.emq_programs import LayerStatistics, bitops_table, score_configs, size_table

    config = recipe.config
    require_sections(config, ("allocate", "data"), "allocate")
    settings = AllocateSettings(**config["allocate"])
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    stats = LayerStatistics.load(settings.stats)
    if "ptq" not in stats.meta:
        raise RecipeError("not a statistics file written by `lightning-nas mqbench`", key="allocate.stats",
                          given=settings.stats)
    ptq = PTQSettings(**stats.meta["ptq"])
    if file_hash(settings.checkpoint) != ptq.checkpoint_hash:
        raise RecipeError("the checkpoint is not the one the statistics were computed on", key="allocate.checkpoint",
                          given=settings.checkpoint)
    cost = size_table(stats) if settings.budget_metric == "size" else bitops_table(stats)
    gains = {name: proxy_gain(name, stats, settings.program) for name in settings.proxies}
    choices = list(stats.bit_choices)

    planned: list[dict[str, Any]] = []
    for mean_bits in settings.budgets:
        budget = budget_limit(stats, settings.budget_metric, mean_bits)
        try:
            for name, gain in gains.items():
                started = time.perf_counter()
                allocation = ilp_allocation(gain, cost, budget)
                planned.append({"budget_bits": mean_bits, "method": name, "choice": allocation.choice,
                                "proxy_score": allocation.gain, "solve_seconds": time.perf_counter() - started})
            rng = random.Random(f"alloc-random-{settings.seed}-{mean_bits}")
            for i in range(settings.random_configs):
                planned.append({"budget_bits": mean_bits, "method": f"random{i}", "choice": random_feasible(cost, budget, rng)})
        except ValueError as error:
            raise RecipeError(str(error), key="allocate.budgets", given=mean_bits) from None
        if settings.uniform:
            fitting = [j for j, b in enumerate(choices) if cost[:, j].sum() <= budget * (1 + 1e-9)]
            if fitting:
                best = max(fitting, key=lambda j: choices[j])
                planned.append({"budget_bits": mean_bits, "method": "uniform", "choice": (best,) * stats.num_layers})
    for row in planned:
        row["bits"] = [choices[c] for c in row["choice"]]
        index = np.asarray([row["choice"]])
        row["size_bytes"] = float(score_configs(size_table(stats), index)[0])
        row["bitops"] = float(score_configs(bitops_table(stats), index)[0])
        row["mean_bits"] = float(np.dot(stats.scalars["params"], row["bits"]) / stats.scalars["params"].sum())

    store = PairStore(run_dir / STORE_FILE)
    done = {p.pair_key: p for p in store.pairs(kind=KIND, checkpoint_hash=ptq.checkpoint_hash)}
    todo = list(dict.fromkeys(tuple(r["bits"]) for r in planned
                              if config_key(ptq, r["bits"]) not in done))
    if todo:
        datamodule = DATA.build(config["data"])
        datamodule.setup("fit")
        network = load_network(settings.checkpoint, "allocate.checkpoint")
        resolution = input_resolution(network, datamodule, "allocate.checkpoint")
        bn_batches, _, _ = held_out(datamodule, ptq.bn_images, settings.batch_size, resolution)
        evaluator = build_evaluator(network.model, ptq, bn_batches, test_batches(datamodule, resolution))
        with progress_bar("allocated configs", settings.progress, fields=["{task.fields[note]}"]) as progress:
            bar = progress.add_task("configs", total=len(todo), note="")
            for bits in todo:
                started = time.perf_counter()
                top1, loss = evaluator.evaluate(list(bits))
                key = config_key(ptq, list(bits))
                store.add(Pair(arch={"network": type(network.model).__name__, "layers": ptq.layers},
                               policy={"w_bits": list(bits), "a_bits": ptq.activation_bits, "ptq": ptq_id(ptq)},
                               resolution=int(resolution or datamodule.image_size), top1=top1, loss=loss,
                               checkpoint_hash=ptq.checkpoint_hash, seed=settings.seed,
                               seconds=time.perf_counter() - started, kind=KIND, pair_key=key))
                progress.update(bar, advance=1, note=f"last top-1 {top1:.2f}")
        done = {p.pair_key: p for p in store.pairs(kind=KIND, checkpoint_hash=ptq.checkpoint_hash)}
    for row in planned:
        pair = done[config_key(ptq, row["bits"])]
        row["top1"], row["loss"] = pair.top1, pair.loss

    rows = [r for r in planned if not r["method"].startswith("random")]
    for mean_bits in settings.budgets:
        randoms = [r for r in planned if r["budget_bits"] == mean_bits and r["method"].startswith("random")]
        if randoms:
            best = max(randoms, key=lambda r: r["top1"])
            rows.append({**best, "method": f"random_best_of_{len(randoms)}"})
            rows.append({"budget_bits": mean_bits, "method": f"random_mean_of_{len(randoms)}",
                         "top1": float(np.mean([r["top1"] for r in randoms])),
                         "loss": float(np.mean([r["loss"] for r in randoms])),
                         "mean_bits": float(np.mean([r["mean_bits"] for r in randoms]))})
    rows.sort(key=lambda r: (r["budget_bits"], r["method"]))
    columns = ["budget_bits", "method", "mean_bits", "size_bytes", "bitops", "proxy_score", "top1", "loss", "bits"]
    with replacing(run_dir / "allocation.csv") as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([" ".join(map(str, r[c])) if c == "bits" and c in r else
                             (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in columns])
    write_json(run_dir / "allocation.json",
        {"budget_metric": settings.budget_metric, "layers": ptq.layers,
         "rows": [{k: v for k, v in r.items() if k != "choice"} for r in rows],
         "random": [{k: v for k, v in r.items() if k != "choice"} for r in planned if r["method"].startswith("random")]})
    _plot(run_dir / "allocation.png", [r for r in rows if not r["method"].startswith("random_mean")],
          list(settings.budgets))
    log_summary(config, run_dir, {f"{r['method']}_{r['budget_bits']}": r["top1"] for r in rows}, "allocate",
                (columns, [[str(r.get(c, "")) for c in columns] for r in rows]), run_dir / "allocation.png")
    for r in rows:
        print(f"budget {r['budget_bits']:.2f} bits  {r['method']:<22} mean bits {r['mean_bits']:.3f}  "
              f"top-1 {r['top1']:.2f} %")
    return run_dir
