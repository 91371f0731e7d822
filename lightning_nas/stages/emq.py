"""``lightning-nas emq``: evolve a mixed-precision proxy (EMQ) on a benchmark built by ``mqbench``.

Reads the benchmark's statistics (``stats.npz``) and pairs, splits the configurations into a
training part (the fitness) and a held-out part (the report), runs
:class:`~lightning_nas.search.emq_evolution.ProxyEvolution` and scores every hand-made proxy on the
same split. Writes into ``<run_dir>/emq/``:

* ``best_program.json``: the found program (structure and text), its Spearman / Kendall on both parts;
* ``proxies.csv``: every hand-made proxy and the evolved one, Spearman and Kendall on both parts;
* ``evolution.csv`` / ``evolution.png``: best training fitness per generation;
* ``summary.json``: wall time (and per generation), candidates scored, rejections by reason.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing, save_png, write_json
from ..predictors.pair_store import PairStore
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir
from .mqbench import KIND, PTQSettings, log_summary, ptq_id

OUT_DIR = "emq"
PROGRAM_FILE = "best_program.json"
MIN_CONFIGS = 6


def load_benchmark(store_path: str | Path, stats: Any, key: str) -> Any:
    """The stored ``mq`` pairs measured with the statistics' network and PTQ settings, as a benchmark."""
    from ..search.emq_evolution import Benchmark
    from ..spaces.emq_programs import config_indices

    if "ptq" not in stats.meta:
        raise RecipeError("not a statistics file written by `lightning-nas mqbench`", key=key.replace("store", "stats"))
    ptq = PTQSettings(**stats.meta["ptq"])
    pairs = [p for p in PairStore(store_path).pairs(kind=KIND, checkpoint_hash=ptq.checkpoint_hash)
             if p.policy and p.policy.get("ptq") == ptq_id(ptq)]
    if len(pairs) < MIN_CONFIGS:
        raise RecipeError(f"the store holds {len(pairs)} benchmark pairs of this network; at least {MIN_CONFIGS} "
                          "are needed (run the mqbench recipe first)", key=key, given=str(store_path))
    index = config_indices(stats, [p.policy["w_bits"] for p in pairs])
    return Benchmark(index, np.array([p.top1 for p in pairs], dtype=np.float64))


def _plot(path: Path, histories: list[list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for restart, history in enumerate(histories):
        axis.plot(np.arange(1, len(history) + 1), history, label=f"restart {restart}")
    axis.set_xlabel("generation")
    axis.set_ylabel("best Spearman (training configs)")
    axis.legend(fontsize=8)
    save_png(figure, path)


def run(recipe: LoadedRecipe) -> Path:
    from ..recipe.sections import EMQSearchSettings
    from ..search.emq_evolution import ProxyEvolution, rank_correlations, split_benchmark
    from ..spaces.emq_programs import HAND_MADE, LayerStatistics, hand_made_table

    config = recipe.config
    require_sections(config, ("emq",), "emq")
    settings = EMQSearchSettings(**config["emq"])
    if settings.restarts < 1 or settings.generations < 0:
        raise RecipeError("restarts must be positive and generations not negative", key="emq",
                          given={"restarts": settings.restarts, "generations": settings.generations})
    seed = int(config.get("seed", 0) if settings.seed is None else settings.seed)
    run_dir = prepare_run_dir(recipe)
    out = run_dir / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    stats = LayerStatistics.load(settings.stats)
    bench = load_benchmark(settings.store, stats, "emq.store")
    try:
        train, held = split_benchmark(bench, settings.train_fraction, seed)
    except ValueError as error:
        raise RecipeError(str(error), key="emq.train_fraction", given=settings.train_fraction) from None

    results, histories = [], []
    with progress_bar("evolving proxies", settings.progress, fields=["{task.fields[note]}"]) as progress:
        for restart in range(settings.restarts):
            bar = progress.add_task("generations", total=settings.generations, note="")
            evolution = ProxyEvolution(stats, train, population=settings.population,
                                       chain_length=settings.chain_length, screen_configs=settings.screen_configs,
                                       seed=seed + restart)
            result = evolution.run(settings.generations, progress=lambda g, best, bar=bar: progress.update(
                bar, completed=g, note=f"best train Spearman {best:.4f}"))
            results.append(result)
            histories.append(result.best_by_generation or [result.best.fitness])
    best = max(results, key=lambda r: r.best.fitness).best

    rows = []
    for name in HAND_MADE:
        table = hand_made_table(name, stats)
        rows.append({"proxy": name, **{f"train_{k}": v for k, v in rank_correlations(table, train).items()},
                     **{f"heldout_{k}": v for k, v in rank_correlations(table, held).items()}})
    evolved = {"proxy": "emq", **{f"train_{k}": v for k, v in rank_correlations(best.table, train).items()},
               **{f"heldout_{k}": v for k, v in rank_correlations(best.table, held).items()}}
    rows.append(evolved)
    with replacing(out / "proxies.csv") as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    program = {"program": best.program.to_dict(), **{k: v for k, v in evolved.items() if k != "proxy"},
               "train_configs": len(train), "heldout_configs": len(held), "stats": str(settings.stats),
               "seed": seed}
    write_json(out / PROGRAM_FILE, program)
    with replacing(out / "evolution.csv") as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["restart", "generation", "best_train_spearman"])
        for restart, history in enumerate(histories):
            writer.writerows([restart, g + 1, f"{v:.6f}"] for g, v in enumerate(history))
    _plot(out / "evolution.png", histories)
    seconds = sum(r.seconds for r in results)
    summary = {"generations": settings.generations, "restarts": settings.restarts, "seconds": seconds,
               "seconds_per_1000_generations": 1000 * seconds / max(settings.generations * settings.restarts, 1),
               "evaluated": sum(r.evaluated for r in results),
               "rejected": {k: sum(r.rejected[k] for r in results) for k in results[0].rejected},
               "threads": os.environ.get("OMP_NUM_THREADS"), "best_program": str(best.program),
               "train_spearman": evolved["train_spearman"], "heldout_spearman": evolved["heldout_spearman"],
               "heldout_kendall": evolved["heldout_kendall"],
               "best_hand_made": max(rows[:-1], key=lambda r: r["heldout_spearman"]
                                     if np.isfinite(r["heldout_spearman"]) else -2)["proxy"]}
    write_json(out / "summary.json", summary)
    log_summary(config, run_dir, {k: v for k, v in summary.items() if k != "rejected"}, "emq",
                (list(rows[0]), [list(r.values()) for r in rows]), out / "evolution.png")
    print(f"emq: {settings.generations} generations x {settings.restarts} in {seconds:.1f} s; best program "
          f"{best.program}; Spearman train {evolved['train_spearman']:.3f}, held-out "
          f"{evolved['heldout_spearman']:.3f} (Kendall {evolved['heldout_kendall']:.3f}); best hand-made on "
          f"held-out: {summary['best_hand_made']}")
    print(f"wrote {out / PROGRAM_FILE}, {out / 'proxies.csv'}")
    return run_dir
