"""How many candidates per second does the joint search score, strategy by strategy?

Runs the searches through the library (the same objects ``lightning-nas search`` builds), one
after the other in one process: the joint OFA MobileNetV3 (CIFAR) x APQ 4/6/8-bit policy space,
the quantization-aware predictor at its production size (3 x 400 hidden units; weights from
``--predictor`` or random, which does not change the speed), the counts and BitFusion cost
models and the APQ recipe's constraints. Every strategy is an NNI strategy run by the batched
engine (``--engine sequential``: NNI's one-trial-at-a-time engine instead);
``apq_evolution_direct`` is the APQ evolution's own loop without NNI, the reference the NNI
strategy is tested against. Prints one line per search (predictor, cost-model and other time)
and a table, with every rate also as a ratio to the first strategy measured.

Goals (issue 23; 50,000 evaluations, 1 thread; TPE 10,000)::

    python benchmarks/search_speed.py --evaluations 50000 --tpe-evaluations 10000 --threads 1 --json OUT.json

One strategy, or NNI's sequential engine for comparison::

    python benchmarks/search_speed.py --strategy regularized_evolution --engine sequential --evaluations 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEARCH_STRATEGIES = ("apq_evolution", "apq_evolution_direct", "random", "regularized_evolution", "grid", "tpe",
                     "policy_rl")
DEFAULT_STRATEGIES = ("apq_evolution", "apq_evolution_direct", "regularized_evolution", "random", "grid", "tpe")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=50_000)
    parser.add_argument("--tpe-evaluations", type=int, default=10_000,
                        help="budget of tpe (its cost per suggestion grows with its history)")
    parser.add_argument("--strategy", choices=SEARCH_STRATEGIES, action="append", default=None,
                        help=f"repeatable; default: {' '.join(DEFAULT_STRATEGIES)}")
    parser.add_argument("--engine", choices=("batched", "sequential"), default="batched")
    parser.add_argument("--concurrency", type=int, default=100, help="models in flight (batched engine)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (predictor)")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="a quantization-aware predictor.pt; default: a random one of the production size")
    parser.add_argument("--space", default="ofa_mbv3_cifar", help="registered OFA space name")
    parser.add_argument("--constraint", action="append", default=None, metavar="METRIC=MAX",
                        help="hard limit (repeatable); default: the apq_int8 recipe's latency_ms=0.45 "
                             "energy_mj=0.6 bitops=6e8")
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--parents", type=int, default=25)
    parser.add_argument("--mutations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def _options(strategy: str, args: argparse.Namespace) -> dict:
    """The options ``lightning-nas search`` gives each strategy for the recipe's settings."""
    if strategy.startswith("apq_evolution"):
        return {"population_size": args.population, "parents": args.parents, "mutations": args.mutations}
    if strategy == "regularized_evolution":
        return {"population_size": args.population, "sample_size": args.parents, "mutation_prob": 0.1}
    return {}


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel
    from lightning_nas.predictors.accuracy import QuantAccuracyPredictor, load_predictor
    from lightning_nas.registry import SPACES
    from lightning_nas.search.evolution import APQEvolution
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.search.nni_strategies import NNISearch, make_strategy
    from lightning_nas.search.scoring import Scorer
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    make_strategy("random")  # imports NNI (seconds) before anything is timed
    imported = time.perf_counter() - started
    space = SPACES.build({"name": args.space})
    policies = QuantPolicySpace()
    joint = JointSpace(space, policies)
    if args.predictor is not None:
        predictor = load_predictor(args.predictor)
    else:
        torch.manual_seed(args.seed)
        predictor = QuantAccuracyPredictor(space.encoding_size, policies.encoding_size(space.num_blocks), hidden=400,
                                           layers=3, base_accuracy=70.0)
    t = time.perf_counter()
    models = {"counts": CountsCostModel(space), "bitfusion": BitFusionCostModel(space)}
    tables = time.perf_counter() - t
    constraints = {"latency_ms": 0.45, "energy_mj": 0.6, "bitops": 6.0e8}
    if args.constraint:
        constraints = {k: float(v) for k, _, v in (c.partition("=") for c in args.constraint)}

    results = []
    for strategy in args.strategy or DEFAULT_STRATEGIES:
        evaluations = args.tpe_evaluations if strategy == "tpe" else args.evaluations
        scorer = Scorer(joint, predictor, models, constraints)
        # time the two scoring parts by wrapping them; the rest of the wall time is the strategy
        spent = {"predictor": 0.0, "cost_models": 0.0}

        def timed(name, function, spent=spent):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return function(*a, **k)
                finally:
                    spent[name] += time.perf_counter() - t0
            return wrapper

        scorer.accuracy = timed("predictor", scorer.accuracy)
        scorer.costs = timed("cost_models", scorer.costs)
        options = _options(strategy, args)
        extra: dict = {}
        t, cpu = time.perf_counter(), time.process_time()
        if strategy == "apq_evolution_direct":
            search = APQEvolution(joint, scorer, evaluations=evaluations, seed=args.seed, **options)
            history = search.run()
            engine = "none (direct loop)"
            extra = {"generations": search.stats["generations"], "rejected": search.stats["rejected"]}
        else:
            with tempfile.TemporaryDirectory() as directory:
                search = NNISearch(joint, scorer, strategy, evaluations, directory, seed=args.seed, options=options,
                                   engine=args.engine, concurrency=args.concurrency)
                history = search.run()
            engine = args.engine if args.engine == "sequential" else f"batched, {search.concurrency} in flight"
            if search.evolution is not None:
                extra = {"generations": search.evolution.stats["generations"],
                         "rejected": search.evolution.stats["rejected"]}
        seconds = time.perf_counter() - t
        cpu_seconds = time.process_time() - cpu
        best = history.top_k(1)
        result = {
            "strategy": strategy,
            "engine": engine,
            "evaluations": len(history),
            "seconds": round(seconds, 3),
            "candidates_per_second": round(len(history) / seconds, 1),
            # CPU time of this process: the wall time the search would take on an otherwise idle core
            "cpu_seconds": round(cpu_seconds, 3),
            "candidates_per_cpu_second": round(len(history) / cpu_seconds, 1),
            "predictor_seconds": round(spent["predictor"], 3),
            "cost_model_seconds": round(spent["cost_models"], 3),
            "other_seconds": round(seconds - spent["predictor"] - spent["cost_models"], 3),
            "cost_evaluations": scorer.cost_evaluations,
            "feasible": int(history.scores.feasible.sum()),
            "best_accuracy": float(history.scores.accuracy[best[0]]) if best else None,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **extra,
        }
        results.append(result)
        print(f"{strategy} ({engine}): {result['evaluations']} candidates in {seconds:.1f} s = "
              f"{result['candidates_per_second']:.0f} candidates/s (predictor {spent['predictor']:.1f} s, cost models "
              f"{spent['cost_models']:.1f} s, strategy, NNI and bookkeeping {result['other_seconds']:.1f} s; "
              f"load average {result['load_average']:.1f}); CPU time {cpu_seconds:.1f} s = "
              f"{result['candidates_per_cpu_second']:.0f} candidates per CPU second", flush=True)

    first = results[0]
    print()
    print("| strategy | engine | candidates | wall time | candidates/s | CPU time | candidates per CPU s | "
          f"vs {first['strategy']} (CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['strategy']} | {r['engine']} | {r['evaluations']:,} | {r['seconds']:.1f} s | "
              f"{r['candidates_per_second']:,.0f} | {r['cpu_seconds']:.1f} s | {r['candidates_per_cpu_second']:,.0f} | "
              f"{r['candidates_per_cpu_second'] / first['candidates_per_cpu_second']:.2f}x |")
    meta = {"constraints": constraints, "import_seconds": round(imported, 2), "cost_table_seconds": round(tables, 2),
            "threads": args.threads, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    print(f"\nthreads {args.threads}, {os.cpu_count()} CPUs, Python {meta['python']}, constraints {constraints}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, **meta}, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
