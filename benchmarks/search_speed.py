"""How many candidates per second does the joint search score?

Runs one search through the library (the same objects ``lightning-nas search`` builds): the
joint OFA MobileNetV3 (CIFAR) x APQ 4/6/8-bit policy space, the quantization-aware predictor at
its production size (3 x 400 hidden units; weights from ``--predictor`` or random, which does not
change the speed), the counts and BitFusion cost models and the APQ recipe's constraints.
Prints candidates/s and where the time went (predictor, cost models, the rest: evolution
operators, canonical forms, bookkeeping).

Goal (issue): an APQ-scale search, about 50,000 candidate evaluations, in under 60 s on 2 cores::

    python benchmarks/search_speed.py --evaluations 50000 --threads 1 --json runs/search_speed.json

NNI strategies evaluate one trial at a time; compare them with a smaller budget::

    python benchmarks/search_speed.py --strategy regularized_evolution --evaluations 2000
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

SEARCH_STRATEGIES = ("apq_evolution", "random", "regularized_evolution", "tpe", "grid", "policy_rl")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=50_000)
    parser.add_argument("--strategy", choices=SEARCH_STRATEGIES, default="apq_evolution")
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


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel
    from lightning_nas.predictors.accuracy import QuantAccuracyPredictor, load_predictor
    from lightning_nas.registry import SPACES
    from lightning_nas.search.evolution import APQEvolution
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.search.nni_strategies import NNISearch
    from lightning_nas.search.scoring import Scorer
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

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
    scorer = Scorer(joint, predictor, models, constraints)

    # time the two scoring parts by wrapping them; the rest of the wall time is the strategy
    spent = {"predictor": 0.0, "cost_models": 0.0}

    def timed(name, function):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    scorer.accuracy = timed("predictor", scorer.accuracy)
    scorer.costs = timed("cost_models", scorer.costs)

    t, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if args.strategy == "apq_evolution":
        search = APQEvolution(joint, scorer, population_size=args.population, parents=args.parents,
                              mutations=args.mutations, evaluations=args.evaluations, seed=args.seed)
        history = search.run()
        extra = {"generations": search.stats["generations"], "rejected": search.stats["rejected"]}
    else:
        with tempfile.TemporaryDirectory() as directory:
            history = NNISearch(joint, scorer, args.strategy, args.evaluations, directory, seed=args.seed).run()
    seconds = time.perf_counter() - t
    cpu_seconds = time.process_time() - cpu
    best = history.top_k(1)
    result = {
        "strategy": args.strategy,
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
        "best_accuracy": float(history.scores.accuracy[best[0]]) if best else None,
        "constraints": constraints,
        "import_seconds": round(imported, 2),
        "cost_table_seconds": round(tables, 2),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        **extra,
    }
    print(f"{args.strategy}: {result['evaluations']} candidates in {seconds:.1f} s = "
          f"{result['candidates_per_second']:.0f} candidates/s (predictor {spent['predictor']:.1f} s, cost models "
          f"{spent['cost_models']:.1f} s, operators and bookkeeping {result['other_seconds']:.1f} s; "
          f"{scorer.cost_evaluations} cost evaluations; load average {result['load_average']}); "
          f"CPU time {cpu_seconds:.1f} s = {result['candidates_per_cpu_second']:.0f} candidates per CPU second")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
