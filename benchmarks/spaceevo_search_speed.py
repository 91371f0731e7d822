"""How long does SpaceEvo's space search (aging evolution over tables) take?

Without ``--tables`` it times synthetic tables of the real shape: every sub-stage of every cell
(stage, block type) of the CIFAR layout, its latency proportional to its MACs (fed by the middle
width of the previous stage) and a loss that falls with width and depth, with noise; the speed
depends on the table sizes, not on where the numbers come from. With ``--tables`` (a CSV of
:class:`~lightning_nas.search.spaceevo.SpaceEvoTables`) it times the real tables. Budgets default to
the 25th, 50th and 75th percentile of the latency of random subnets of random spaces.

Prints the wall time, milliseconds per space, the best spaces with each budget's p, L and T, the
homogeneous baselines, and the largest latency term T met (whether the latency term matters).

Goal (issue 19): the reference settings (population 500, sample 125, 5,000 spaces) in under
5 minutes on the 2 cores::

    python benchmarks/spaceevo_search_speed.py --subnets 10000
    python benchmarks/spaceevo_search_speed.py --subnets 100000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_tables(seed: int) -> object:
    import numpy as np

    from lightning_nas.search.spaceevo import SpaceEvoTables
    from lightning_nas.spaces import spaceevo_layout as L

    layout = L.CIFAR_LAYOUT
    rng = np.random.default_rng(seed)
    quality = {name: rng.uniform(0.8, 1.2) for name in layout.block_types}
    rows = []
    for stage, spec in enumerate(layout.stages):
        previous = layout.stem.channels if stage == 0 else layout.stages[stage - 1].widths[len(spec.widths) // 2]
        for block_type in layout.block_types:
            for sub in L.substage_choices(stage, block_type, None, layout):
                macs = sum(s.macs for s in L.substage_layers(stage, block_type, sub, previous, layout))
                capacity = sub.width * sub.depth * math.sqrt(sub.expand) * (1 + 0.1 * sub.kernel)
                rows.append({"stage": stage, "block_type": block_type, "width": sub.width, "depth": sub.depth,
                             "kernel": sub.kernel, "expand": sub.expand,
                             "latency_ms": 0.02 * sub.depth + macs / 50e6 * rng.uniform(0.9, 1.1),
                             "loss": quality[block_type] * 20 / capacity * rng.uniform(0.9, 1.1)})
    return SpaceEvoTables.from_rows(rows, layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=Path, help="CSV of sub-stage tables (default: synthetic)")
    parser.add_argument("--population", type=int, default=500)
    parser.add_argument("--sample", type=int, default=125)
    parser.add_argument("--evaluations", type=int, default=5000)
    parser.add_argument("--subnets", type=int, default=10_000, help="subnets drawn per budget (reference 100,000)")
    parser.add_argument("--budgets", type=float, nargs="+", help="latency budgets (ms)")
    parser.add_argument("--fixed-latency", type=float, default=0.1, help="stem + head latency (ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import numpy as np

    from lightning_nas.search.spaceevo import QTSettings, SpaceEvoTables, evolve_spaces, qt_score, sample_subnets
    from lightning_nas.spaces import spaceevo_layout as L

    started = time.perf_counter()
    tables = SpaceEvoTables.load_csv(args.tables) if args.tables else synthetic_tables(args.seed)
    tables.check_complete()
    rows = sum(len(cell) for cell in tables.cells.values())
    print(f"tables: {len(tables.cells)} cells, {rows} rows ({time.perf_counter() - started:.1f} s to build)")
    budgets = args.budgets
    if not budgets:
        rng = np.random.default_rng(args.seed)
        latency = np.concatenate([sample_subnets(tables, L.random_space(rng), rng, 200, args.fixed_latency)[0]
                                  for _ in range(200)])
        budgets = [round(float(q), 3) for q in np.percentile(latency, [25, 50, 75])]
    settings = QTSettings(budgets_ms=tuple(budgets), num_subnets=args.subnets, fixed_latency_ms=args.fixed_latency,
                          seed=args.seed)
    result = evolve_spaces(tables, settings, population_size=args.population, sample_size=args.sample,
                           evaluations=args.evaluations, seed=args.seed)
    evaluated = len(result.history)
    print(f"budgets {budgets} ms, {args.subnets} subnets per budget, population {args.population}, "
          f"sample {args.sample}: {evaluated} spaces in {result.seconds:.1f} s "
          f"({1000 * result.seconds / evaluated:.2f} ms per space), {result.dropped_duplicates} duplicate "
          f"children dropped, exhausted={result.exhausted}")

    def describe(entry: object) -> str:
        terms = "; ".join(f"c={b.budget_ms:g}: p={b.p:.3f} L={b.loss:.4f} T={b.latency_term:.4f}"
                          for b in entry.score.budgets)
        return f"{entry.score.score:8.3f}  {entry.space.id}  [{terms}]"

    print("best spaces:")
    for entry in result.best(5):
        print("  " + describe(entry))
    print("homogeneous baselines:")
    for entry in result.history[: len(L.homogeneous_spaces(tables.layout))]:
        print("  " + describe(entry))
    terms = [b.latency_term for e in result.history for b in e.score.budgets if b.p > 0]
    infeasible = sum(b.p == 0 for e in result.history for b in e.score.budgets)
    print(f"latency term T over all feasible (space, budget) pairs: max {max(terms):.4f}, "
          f"mean {np.mean(terms):.4f}; {infeasible} pairs with p = 0")
    if args.json:
        best = result.best(1)[0]
        figures = {"seconds": result.seconds, "spaces": evaluated, "subnets": args.subnets, "budgets_ms": budgets,
                   "population": args.population, "sample": args.sample, "best": best.row(),
                   "max_latency_term": max(terms), "check_score": qt_score(tables, best.space, settings).score}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
