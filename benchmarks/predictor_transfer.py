"""APQ's claim: a quantization-aware predictor transferred from the fp32 predictor reaches with N
quantized pairs what one trained from scratch needs several times N for.

For every N in ``--sizes`` and every seed, the quantized pairs of ``--store`` are split by the seed
into a test set (``--test-pairs``) and a training pool, the first N of the pool train two
predictors of the same shape, one starting from the fp32 predictor's weights (``transfer``) and one
from a random initialisation (``scratch``), and both are scored on the test set (Kendall tau,
RMSE). Prints a markdown table (mean ± std over seeds) and writes ``OUT/results.json`` and
``OUT/sample_efficiency.png``. The fp32 predictor is ``--fp32-predictor``, or is trained here on
every fp32 pair of the store (same width and depth).

    python benchmarks/predictor_transfer.py --store runs/pairs_quant/pairs.sqlite \\
        --fp32-predictor runs/predictor_fp32/predictor.pt --out runs/benchmarks/predictor_transfer

``--wandb`` also logs the table and the plot to Weights & Biases (offline without credentials).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("transfer", "scratch")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="pair store with fp32 and quantized pairs")
    p.add_argument("--fp32-store", type=Path, default=None, help="fp32 pairs from another store (default: --store)")
    p.add_argument("--space", type=json.loads, default={"name": "ofa_mbv3_cifar", "num_classes": 10},
                   help="the space spec the pairs were sampled from (JSON)")
    p.add_argument("--fp32-predictor", type=Path, default=None)
    p.add_argument("--sizes", default="25,50,100,200,400")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--test-pairs", type=int, default=100)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/predictor_transfer"))
    p.add_argument("--wandb", action="store_true")
    return p.parse_args(argv)


def train(store: Path, space: dict, kind: str, *, max_train: int | None, val_fraction: float, seed: int,
          epochs: int, hidden: int, layers: int, lr: float, transfer_from: str | None,
          run_dir: Path) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_nas.data.pairs import PairsDataModule
    from lightning_nas.tasks.predictor import PredictorTask

    pl.seed_everything(seed, verbose=False)
    data = PairsDataModule(path=str(store), space=space, kind=kind, val_fraction=val_fraction, seed=seed,
                           max_train_pairs=max_train, batch_size=256)
    task = PredictorTask(hidden=hidden, layers=layers, lr=lr, transfer_from=transfer_from)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir),
                         check_val_every_n_epoch=epochs)
    trainer.fit(task, datamodule=data)
    return {"train_pairs": len(data.train_set), "test_pairs": len(data.val_set),
            "kendall_tau": task.final_metrics["kendall_tau"], "rmse": task.final_metrics["rmse"]}


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size in sorted({r["size"] for r in runs}):
        out[str(size)] = {}
        for mode in MODES:
            chosen = [r for r in runs if r["size"] == size and r["mode"] == mode]
            taus, rmses = [r["kendall_tau"] for r in chosen], [r["rmse"] for r in chosen]
            out[str(size)][mode] = {"kendall_mean": statistics.fmean(taus), "kendall_std": statistics.pstdev(taus),
                                    "rmse_mean": statistics.fmean(rmses), "rmse_std": statistics.pstdev(rmses),
                                    "seeds": len(chosen)}
    return out


def markdown(summary: dict) -> str:
    lines = ["| quantized training pairs | Kendall tau, transfer | Kendall tau, scratch | RMSE, transfer | RMSE, scratch |",
             "|---:|---|---|---|---|"]
    for size, modes in summary.items():
        t, s = modes["transfer"], modes["scratch"]
        lines.append(f"| {size} | {t['kendall_mean']:.3f} ± {t['kendall_std']:.3f} | "
                     f"{s['kendall_mean']:.3f} ± {s['kendall_std']:.3f} | {t['rmse_mean']:.2f} ± {t['rmse_std']:.2f} | "
                     f"{s['rmse_mean']:.2f} ± {s['rmse_std']:.2f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in summary]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode, colour in zip(MODES, ("tab:blue", "tab:orange"), strict=True):
        for axis, metric in zip(axes, ("kendall", "rmse"), strict=True):
            mean = [summary[str(s)][mode][f"{metric}_mean"] for s in sizes]
            std = [summary[str(s)][mode][f"{metric}_std"] for s in sizes]
            axis.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, color=colour, label=mode)
    for axis, label in zip(axes, ("Kendall tau (test pairs)", "RMSE, top-1 points (test pairs)"), strict=True):
        axis.set_xscale("log")
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xticks([], minor=True)  # log-scale minor labels would overprint the sizes
        axis.set_xlabel("quantized training pairs")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    import torch

    from lightning_nas.predictors.pair_store import PairStore

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    quant = len(PairStore(args.store).pairs(kind="quant"))
    sizes = [int(s) for s in args.sizes.split(",")]
    if quant < args.test_pairs + max(sizes):
        raise SystemExit(f"{args.store} has {quant} quantized pairs; sizes up to {max(sizes)} plus "
                         f"{args.test_pairs} test pairs need {args.test_pairs + max(sizes)}")
    fp32_predictor = args.fp32_predictor
    if fp32_predictor is None:
        fp32_store = args.fp32_store or args.store
        fp32 = train(fp32_store, args.space, "fp32", max_train=None, val_fraction=0.1, seed=0, epochs=args.epochs,
                     hidden=args.hidden, layers=args.layers, lr=args.lr, transfer_from=None,
                     run_dir=args.out / "fp32")
        fp32_predictor = args.out / "fp32" / "predictor.pt"
        print(f"fp32 predictor: {fp32['train_pairs']} pairs, tau {fp32['kendall_tau']:.3f}, "
              f"RMSE {fp32['rmse']:.2f} on {fp32['test_pairs']} held-out fp32 pairs", flush=True)
    runs = []
    for size in sizes:
        for seed in range(args.seeds):
            for mode in MODES:
                started = time.perf_counter()
                result = train(args.store, args.space, "quant", max_train=size, val_fraction=args.test_pairs / quant,
                               seed=seed, epochs=args.epochs, hidden=args.hidden, layers=args.layers, lr=args.lr,
                               transfer_from=str(fp32_predictor) if mode == "transfer" else None,
                               run_dir=args.out / f"{mode}_{size}_{seed}")
                result.update(size=size, seed=seed, mode=mode, seconds=time.perf_counter() - started)
                runs.append(result)
                print(f"n={size} seed={seed} {mode}: tau {result['kendall_tau']:.3f} RMSE {result['rmse']:.2f}",
                      flush=True)
    summary = summarise(runs)
    report = {"store": str(args.store), "fp32_predictor": str(fp32_predictor), "quant_pairs": quant,
              "settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(summary, args.out / "sample_efficiency.png")
    table = markdown(summary)
    print(table)
    if args.wandb:
        import wandb

        run = wandb.init(project="lightning-nas", job_type="predictor-transfer", dir=str(args.out),
                         config=report["settings"])
        rows = [[int(s), m, v["kendall_mean"], v["kendall_std"], v["rmse_mean"], v["rmse_std"]]
                for s, modes in summary.items() for m, v in modes.items()]
        run.log({"sample_efficiency/table": wandb.Table(
            columns=["pairs", "mode", "kendall_mean", "kendall_std", "rmse_mean", "rmse_std"], data=rows),
            "sample_efficiency/plot": wandb.Image(str(args.out / "sample_efficiency.png"))})
        run.finish()
    return report


if __name__ == "__main__":
    main()
