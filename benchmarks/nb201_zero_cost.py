"""Zero-cost proxies and ParZC on the NAS-Bench-201 development split (CIFAR-10).

Protocol:

* architectures: ``nb201_dev.csv`` (2,000 cells), target ``CIFAR10TestAccuracy200Epochs``;
  ``--num-archs`` keeps the first N of a permutation drawn with ``--split-seed``;
* split: the first half (or ``--pool-size``) of that permutation is the *training pool*, the rest
  the *evaluation set* (1000 / 1000 for the full file); nothing of the evaluation set is ever used
  for fitting (neither the ParZC weights nor the min-max scaler);
* statistics: node-wise statistics and aggregate scores on one CIFAR-10 training batch of 64
  images chosen by ``--batch-seed``, networks initialised with ``--init-seed`` (cached and
  resumable under ``--cache``). Phase 1 computes ParZC's proxies (``--parzc-proxies``, all but
  grasp by default) for every architecture; phase 2 computes the others (grasp) on the
  evaluation set only: grasp's Hessian-vector product through batch norm costs more than the
  other nine proxies together on CPU, and it is the weakest proxy;
* proxies: Kendall tau (tau-b) and Spearman rho of each aggregate score vs accuracy on the
  evaluation set;
* ParZC: for every training size, 5 seeds each draw that many architectures from the pool,
  train a ParZC ranker (DiffKendall loss by default), and are scored on the whole evaluation set;
  mean and std over seeds.

Example (one thread, resumable)::

    python benchmarks/nb201_zero_cost.py --threads 1 --json runs/benchmarks/nb201_zero_cost.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nas.predictors.zc_cache import (  # noqa: E402
    DEFAULT_PROXIES,
    PARZC_PROXIES,
    compute_statistics,
    load_cifar10_batch,
)
from lightning_nas.spaces.nb201 import format_arch, parse_arch  # noqa: E402

DEV_CSV = Path(__file__).resolve().parents[2] / "shared" / Path("benchdata/nb201/nb201_dev.csv")
CIFAR = Path(__file__).resolve().parents[2] / "shared" / Path("data/cifar10/train.npz")
TARGET = "CIFAR10TestAccuracy200Epochs"
PUBLISHED_TAU = {"synflow": 0.54, "nwot": 0.59, "jacov": 0.58, "snip": 0.44, "grasp": 0.38,
                 "params": 0.56, "flops": 0.52, "parzc@78": 0.69, "parzc@781": 0.78}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=DEV_CSV)
    p.add_argument("--cifar", type=Path, default=CIFAR)
    p.add_argument("--cache", type=Path, default=Path("runs/benchmarks/nb201_zc_stats.jsonl"))
    p.add_argument("--json", type=Path, default=Path("runs/benchmarks/nb201_zero_cost.json"))
    p.add_argument("--num-archs", type=int, default=2000, help="use the first N of the seeded permutation")
    p.add_argument("--pool-size", type=int, default=None,
                   help="training pool = first P of those N (default N // 2); the rest is the evaluation set")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--batch-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--train-sizes", default="78,156,469,781")
    p.add_argument("--seeds", type=int, default=5, help="ParZC repetitions per training size")
    p.add_argument("--loss", default="diffkendall", choices=["diffkendall", "pairwise", "mse"])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--alpha", type=float, default=50.0, help="DiffKendall sharpness")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parzc-proxies", default=",".join(PARZC_PROXIES),
                   help="node-wise statistics ParZC uses (computed for every architecture)")
    p.add_argument("--other-proxy-archs", type=int, default=None,
                   help="compute the proxies ParZC does not use on only the first M evaluation archs")
    p.add_argument("--stats-only", action="store_true", help="only fill the statistics cache")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def read_dev(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    archs = [format_arch(parse_arch(r["ArchitectureString"])) for r in rows]
    return archs, np.array([float(r[TARGET]) for r in rows])


def split(n_total: int, num: int, seed: int, pool_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training pool and evaluation set: consecutive pieces of one seeded permutation.

    Statistics are computed in permutation order, so any finished prefix of the cache is a
    uniform random subset and ``--num-archs`` can use it without recomputation.
    """
    perm = np.random.default_rng(seed).permutation(n_total)[: min(num, n_total)]
    pool = len(perm) // 2 if pool_size is None else min(pool_size, len(perm) - 1)
    return perm[:pool], perm[pool:]


def correlations(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    tau = sps.kendalltau(pred, target).statistic
    rho = sps.spearmanr(pred, target).statistic
    return float(np.nan_to_num(tau)), float(np.nan_to_num(rho))


def train_parzc(stats, acc: np.ndarray, train_rows: np.ndarray, eval_rows: np.ndarray,
                seed: int, loss: str, epochs: int, alpha: float) -> np.ndarray:
    """Fit a ParZC ranker on ``train_rows`` through the Lightning task; scores for ``eval_rows``."""
    import lightning.pytorch as pl

    from lightning_nas.data.zc_stats import ZCStatsDataModule
    from lightning_nas.tasks.parzc import ParZCTask

    dm = ZCStatsDataModule.from_arrays(
        features=stats.nodes, targets=acc, train_index=train_rows.tolist(), val_index=eval_rows.tolist(),
    )
    pl.seed_everything(seed, workers=True, verbose=False)
    task = ParZCTask(num_nodes=stats.nodes.shape[1], num_stats=stats.nodes.shape[2], loss=loss, alpha=alpha,
                     proxies=list(stats.proxies), stats_seed=stats.seed)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         check_val_every_n_epoch=epochs, deterministic=True)
    trainer.fit(task, datamodule=dm)
    task.eval()
    with torch.no_grad():
        return task.score(torch.as_tensor(stats.nodes[eval_rows], dtype=torch.float64)).numpy()


def _quiet_lightning() -> None:
    # 20 fits would otherwise print the same tips and deprecation notices 20 times.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")


def record_seconds(cache: Path, proxies: Sequence[str]) -> list[float]:
    """Wall seconds of the cache records that computed exactly ``proxies`` for one architecture."""
    with cache.open() as f:
        lines = f.read().splitlines()[1:]
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if sorted(rec["proxies"]) == sorted(proxies):
            out.append(float(rec["seconds"]))
    return out


def _timing(cache: Path, parzc_proxies: Sequence[str]) -> dict:
    out = {}
    for label, group in (("parzc_statistics", parzc_proxies), ("grasp", ["grasp"]), ("all_10", DEFAULT_PROXIES)):
        secs = record_seconds(cache, group)
        if secs:
            out[label] = {"archs": len(secs), "mean_s": float(np.mean(secs)), "median_s": float(np.median(secs))}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    _quiet_lightning()
    torch.set_num_threads(args.threads)
    parzc_proxies = [p.strip() for p in args.parzc_proxies.split(",") if p.strip()]
    archs, acc = read_dev(args.csv)
    pool, evaluation = split(len(archs), args.num_archs, args.split_seed, args.pool_size)
    order = np.concatenate([pool, evaluation])  # = the permutation prefix, the order statistics are computed in
    images, labels = load_cifar10_batch(args.cifar, batch_size=64, seed=args.batch_seed)
    start = time.perf_counter()
    progress = not args.no_progress
    # Phase 1: ParZC's node-wise statistics for every architecture (pool and evaluation set).
    stats = compute_statistics([archs[i] for i in order], parzc_proxies, images, labels, seed=args.init_seed,
                               cache_path=args.cache, progress=progress)
    # Phase 2: the remaining proxies (grasp's Hessian-vector product dominates the cost) only where
    # they are evaluated.
    others = [p for p in DEFAULT_PROXIES if p not in parzc_proxies]
    eval_archs = [archs[i] for i in evaluation][: args.other_proxy_archs]
    extra = compute_statistics(eval_archs, others, images, labels, seed=args.init_seed,
                               cache_path=args.cache, progress=progress) if others else None
    stats_wall = time.perf_counter() - start
    if args.stats_only:
        return {}
    acc_rows = acc[order]
    pool_rows = np.arange(len(pool))
    eval_rows = np.arange(len(pool), len(order))

    result: dict = {
        "protocol": {"csv": str(args.csv), "target": TARGET, "num_archs": int(len(order)),
                     "pool": int(len(pool_rows)), "eval": int(len(eval_rows)), "split_seed": args.split_seed,
                     "batch_seed": args.batch_seed, "init_seed": args.init_seed, "batch_size": 64,
                     "threads": args.threads, "loss": args.loss, "epochs": args.epochs, "alpha": args.alpha,
                     "parzc_proxies": parzc_proxies, "other_proxies_eval_archs": len(eval_archs) if others else 0},
        "seconds_per_arch": _timing(args.cache, parzc_proxies),
        "statistics_wall_s_this_run": stats_wall,
        "proxies": {}, "parzc": {},
    }
    for name in DEFAULT_PROXIES:
        if name in stats.proxies:
            pred, target = stats.scores[eval_rows, stats.proxies.index(name)], acc_rows[eval_rows]
        else:
            pred, target = extra.scores[:, extra.proxies.index(name)], acc_rows[eval_rows][: len(eval_archs)]
        tau, rho = correlations(pred, target)
        result["proxies"][name] = {"kendall": tau, "spearman": rho, "archs": int(len(pred))}

    for size in [int(s) for s in args.train_sizes.split(",")]:
        size = min(size, len(pool_rows))
        taus, rhos, secs = [], [], []
        for seed in range(args.seeds):
            train_rows = np.random.default_rng(1000 + seed).choice(pool_rows, size=size, replace=False)
            t0 = time.perf_counter()
            pred = train_parzc(stats, acc_rows, train_rows, eval_rows, seed, args.loss, args.epochs, args.alpha)
            secs.append(time.perf_counter() - t0)
            tau, rho = correlations(pred, acc_rows[eval_rows])
            taus.append(tau)
            rhos.append(rho)
            print(f"parzc n={size} seed={seed}: tau={tau:.4f} rho={rho:.4f} ({secs[-1]:.1f}s)", flush=True)
        result["parzc"][str(size)] = {"kendall_mean": float(np.mean(taus)), "kendall_std": float(np.std(taus)),
                                      "spearman_mean": float(np.mean(rhos)), "spearman_std": float(np.std(rhos)),
                                      "kendall": taus, "spearman": rhos, "train_seconds": float(np.mean(secs))}
    print(markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict) -> str:
    p = result["protocol"]
    timing = ", ".join(f"{k}: {v['mean_s']:.2f} s/arch (n={v['archs']})" for k, v in result["seconds_per_arch"].items())
    lines = [f"NAS-Bench-201 CIFAR-10, {p['eval']} evaluation archs (pool {p['pool']}), batch 64, "
             f"{p['threads']} thread; statistics time {timing}", "",
             "| ranker | Kendall tau | Spearman rho | eval archs | published tau |", "|---|---|---|---|---|"]
    for name, r in result["proxies"].items():
        ref = PUBLISHED_TAU.get(name)
        lines.append(f"| {name} | {r['kendall']:.3f} | {r['spearman']:.3f} | {r['archs']} | {'' if ref is None else ref} |")
    for size, r in result["parzc"].items():
        ref = PUBLISHED_TAU.get(f"parzc@{size}")
        lines.append(f"| ParZC ({size} train) | {r['kendall_mean']:.3f} ± {r['kendall_std']:.3f} | "
                     f"{r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | {p['eval']} | {'' if ref is None else ref} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
