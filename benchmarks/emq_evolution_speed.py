"""How long do 1,000 generations of EMQ's proxy evolution take?

The evolution reads per-layer statistics computed once (``stats.npz``) and a benchmark of
configurations with their accuracies. Without ``--stats``/``--store`` it times a synthetic case of
the real shape: the statistics of an untrained CIFAR ResNet-20 (18 searchable layers, bits 2/3/4)
on one random batch, and 425 random configurations whose "accuracy" is minus a hidden program's
score plus noise (the speed does not depend on where the accuracies come from). With an mqbench run's
``--stats`` and ``--store`` it times the real benchmark. Prints the wall time, time per generation,
programs scored and rejected by reason, and the best fitness.

Goal (issue): 1,000 generations in under 10 minutes on 2 cores::

    python benchmarks/emq_evolution_speed.py --generations 1000
    python benchmarks/emq_evolution_speed.py --stats runs/mqbench_cifar10/stats.npz --store runs/mqbench_cifar10/pairs.sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic(configs: int, seed: int) -> tuple[object, object]:
    import numpy as np
    import torch

    from lightning_nas.nn.cifar_resnet import cifar_resnet
    from lightning_nas.predictors.mq_stats import compute_layer_statistics
    from lightning_nas.search.emq_evolution import Benchmark
    from lightning_nas.spaces.emq_programs import LayerStatistics, Program, program_table, score_configs

    torch.manual_seed(seed)
    model = cifar_resnet(20).eval()
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    started = time.perf_counter()
    stats = compute_layer_statistics(model, model.block_layers(), images, labels, hessian_samples=8, seed=seed)
    print(f"statistics of ResNet-20 on 64 images (8 Hutchinson samples): {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as folder:  # time what the stage reads: the npz round trip
        stats.save(Path(folder) / "stats.npz")
        stats = LayerStatistics.load(Path(folder) / "stats.npz")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, 3, size=(configs, stats.num_layers))
    hidden = Program(("perturb", "hessian"), (("square",), ("abs",)), "multiply")
    score = -score_configs(program_table(hidden, stats), index)
    return stats, Benchmark(index, score + rng.normal(0, 0.3 * score.std(), configs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--configs", type=int, default=425, help="synthetic benchmark size")
    parser.add_argument("--stats", type=Path, help="stats.npz of an mqbench run")
    parser.add_argument("--store", type=Path, help="pairs.sqlite of the same run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from lightning_nas.search.emq_evolution import ProxyEvolution, rank_correlations, split_benchmark

    if args.stats is not None:
        from lightning_nas.spaces.emq_programs import LayerStatistics
        from lightning_nas.stages.emq import load_benchmark

        stats = LayerStatistics.load(args.stats)
        bench = load_benchmark(args.store, stats, "--store")
    else:
        stats, bench = synthetic(args.configs, args.seed)
    train, held = split_benchmark(bench, 0.5, args.seed)
    evolution = ProxyEvolution(stats, train, population=args.population, seed=args.seed)
    result = evolution.run(args.generations)
    figures = {**result.summary(), "heldout": rank_correlations(result.best.table, held),
               "configs": len(bench), "layers": stats.num_layers, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{args.generations} generations (population {args.population}, {len(bench)} configs, "
          f"{stats.num_layers} layers): {result.seconds:.1f} s, {1000 * result.seconds / max(args.generations, 1):.1f} ms "
          f"per generation; {result.evaluated} programs scored, rejected {result.rejected}")
    print(f"best: {result.best.program}; Spearman train {result.best.fitness:.3f}, held-out "
          f"{figures['heldout']['spearman']:.3f}; load average {figures['load_average']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
