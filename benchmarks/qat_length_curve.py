"""The per-pair QAT length of quantized pair collection, chosen from a measured curve.

``--pairs`` fixed (architecture, quantization policy) pairs, pair ``i`` being pair ``i`` of the
collector's plan ``--seed`` (:func:`lightning_nas.callbacks.pairs.plan_rng`), are measured at every
QAT length of ``--steps`` by the collector's own code: :meth:`QuantizedPairCollector.measure` with
``finetune_steps`` set to the length (BN recalibration, range calibration, QAT on the deployment
target's grid, top-1 on held-out images), with the settings of a pair-collection recipe
(``--data cifar10``: recipes/pairs_quant_cifar10.yaml, ``--data digits``: recipes/pairs_quant.yaml,
or ``--recipe``). Every length of a pair finetunes on a prefix of the same training batches from
the same random state, so lengths differ by their steps alone. Each pair is also measured once
in full precision (the fp32 collector's :meth:`AccuracyPairCollector.measure`), for its cost.

The chosen length is the shortest whose ranking of the pairs agrees with the longest's at Kendall
tau >= ``--threshold`` (tau-b, :func:`scipy.stats.kendalltau`). Prints a markdown table (per
length: mean quantized top-1, tau against the longest, seconds per pair) and writes, to ``--out``:
``curve.csv`` (one row per pair and length, appended as each is measured; a cut run resumes from
it and skips the rows it holds), ``summary.json`` and ``qat_length_curve.png``.

    python benchmarks/qat_length_curve.py --checkpoint runs/ofa_supernet_cifar10/checkpoints/last.ckpt \\
        --data cifar10 --data-root ../shared/data/cifar10 --out runs/benchmarks/qat_length_curve
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"cifar10": REPO / "recipes" / "pairs_quant_cifar10.yaml", "digits": REPO / "recipes" / "pairs_quant.yaml"}
CSV_FILE, SUMMARY_FILE, PLOT_FILE = "curve.csv", "summary.json", "qat_length_curve.png"
COLUMNS = ("settings", "checkpoint_hash", "target", "seed", "pair", "kind", "steps", "top1", "loss", "seconds",
           "resolution", "arch", "policy")
#: The ``steps`` value of a full-precision row (no quantization, no finetuning).
FP32 = "fp32"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="supernet checkpoint (lightning-nas fit)")
    p.add_argument("--data", choices=tuple(RECIPES), default="cifar10",
                   help="which pair-collection recipe gives the data and the collector's settings")
    p.add_argument("--recipe", type=Path, default=None, help="another pair-collection recipe (overrides --data)")
    p.add_argument("--data-root", default=None, help="data.root of the recipe (cifar10)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override, e.g. callbacks.pairs.init_args.lr=1e-3 (repeatable)")
    p.add_argument("--target", default="auto", help="deployment target whose quantization grid QAT trains for")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="the plan seed the pairs are drawn with")
    p.add_argument("--steps", default="0,10,30,100", help="QAT lengths (optimizer steps), comma-separated")
    p.add_argument("--threshold", type=float, default=0.8, help="Kendall tau against the longest length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/qat_length_curve"))
    args = p.parse_args(argv)
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    if args.steps[0] < 0 or len(args.steps) < 2:
        p.error(f"--steps needs at least two non-negative lengths, got {args.steps}")
    if args.pairs < 2:
        p.error("--pairs needs at least 2 pairs to rank")
    return args


# --- the curve ------------------------------------------------------------------------------------
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall tau-b of two rankings; ``None`` where it is undefined (a constant ranking)."""
    from scipy import stats

    value = float(stats.kendalltau(x, y).statistic)
    return None if math.isnan(value) else value


def choose_length(top1: Mapping[int, Sequence[float]], threshold: float) -> tuple[dict[int, float | None], int]:
    """({length: Kendall tau of its ranking against the longest length's}, the shortest length whose
    tau reaches ``threshold``). ``top1[length][i]`` is pair ``i``'s top-1 at that length, every
    length listing the same pairs; the longest agrees with itself, so a length is always chosen."""
    lengths = sorted(top1)
    longest = top1[lengths[-1]]
    if any(len(top1[length]) != len(longest) for length in lengths):
        raise ValueError("every length must list the same pairs")
    taus = {length: kendall_tau(top1[length], longest) for length in lengths}
    taus[lengths[-1]] = 1.0
    chosen = next(length for length in lengths if taus[length] is not None and taus[length] >= threshold)
    return taus, chosen


def summarise(rows: list[dict[str, Any]], steps: Sequence[int], threshold: float) -> dict[str, Any]:
    """The curve over the pairs measured at every length (a cut run's complete pairs)."""
    by_pair: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_pair.setdefault(int(row["pair"]), {})[str(row["steps"])] = row
    wanted = [str(s) for s in steps]
    complete = sorted(i for i, measured in by_pair.items() if all(s in measured for s in wanted))
    if len(complete) < 2:
        return {"complete_pairs": len(complete)}
    top1 = {s: [float(by_pair[i][str(s)]["top1"]) for i in complete] for s in steps}
    taus, chosen = choose_length(top1, threshold)
    lengths = []
    for s in steps:
        measured = [by_pair[i][str(s)] for i in complete]
        values = top1[s]
        lengths.append({"steps": s, "top1_mean": statistics.fmean(values), "top1_std": statistics.pstdev(values),
                        "top1_min": min(values), "top1_max": max(values), "kendall_tau": taus[s],
                        "seconds_per_pair": statistics.fmean(float(r["seconds"]) for r in measured)})
    summary: dict[str, Any] = {"complete_pairs": len(complete), "pair_indices": complete, "threshold": threshold,
                               "longest": steps[-1], "chosen_steps": chosen,
                               "chosen_is_longest": chosen == steps[-1], "lengths": lengths}
    fp32 = [by_pair[i][FP32] for i in complete if FP32 in by_pair[i]]
    if len(fp32) == len(complete):
        values = [float(r["top1"]) for r in fp32]
        summary["fp32"] = {"top1_mean": statistics.fmean(values),
                           "kendall_tau_vs_longest": kendall_tau(values, top1[steps[-1]]),
                           "seconds_per_pair": statistics.fmean(float(r["seconds"]) for r in fp32)}
    return summary


def markdown(summary: dict[str, Any]) -> str:
    longest = summary["longest"]
    lines = [f"| QAT steps | pairs | mean quantized top-1 (min-max) | Kendall tau vs {longest} steps | seconds per pair |",
             "|---:|---:|---|---:|---:|"]
    for length in summary["lengths"]:
        tau = "undefined" if length["kendall_tau"] is None else f"{length['kendall_tau']:.3f}"
        lines.append(f"| {length['steps']} | {summary['complete_pairs']} | {length['top1_mean']:.2f} "
                     f"({length['top1_min']:.1f}-{length['top1_max']:.1f}) | {tau} | "
                     f"{length['seconds_per_pair']:.2f} |")
    fp32 = summary.get("fp32")
    if fp32:
        tau = fp32["kendall_tau_vs_longest"]
        lines.append(f"| full precision (no QAT) | {summary['complete_pairs']} | {fp32['top1_mean']:.2f} (fp32 top-1) | "
                     f"{'undefined' if tau is None else f'{tau:.3f}'} | {fp32['seconds_per_pair']:.2f} |")
    note = " (no shorter length agrees: measure longer ones)" if summary["chosen_is_longest"] else ""
    lines.append("")
    lines.append(f"Chosen QAT length: {summary['chosen_steps']} steps, the shortest whose ranking agrees with "
                 f"{longest} steps at Kendall tau >= {summary['threshold']}{note}.")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_nas.files import save_png

    steps = [length["steps"] for length in summary["lengths"]]
    # 0 steps has no place on a log axis: the lengths sit at equal distances, labelled
    positions = list(range(len(steps)))
    by_pair = {(int(r["pair"]), str(r["steps"])): float(r["top1"]) for r in rows}
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index in summary["pair_indices"]:
        left.plot(positions, [by_pair[(index, str(s))] for s in steps], marker="o", alpha=0.6, linewidth=1)
    left.set_ylabel("quantized top-1 (%)")
    left.set_title(f"{summary['complete_pairs']} (architecture, policy) pairs")
    taus = [length["kendall_tau"] for length in summary["lengths"]]
    right.plot([p for p, t in zip(positions, taus, strict=True) if t is not None],
               [t for t in taus if t is not None], marker="o", color="tab:blue")
    right.axhline(summary["threshold"], color="tab:red", linestyle="--", label=f"threshold {summary['threshold']}")
    right.axvline(steps.index(summary["chosen_steps"]), color="tab:green", linestyle=":",
                  label=f"chosen: {summary['chosen_steps']} steps")
    right.set_ylabel(f"Kendall tau vs {summary['longest']} steps")
    right.legend(loc="lower right")
    for axis in (left, right):
        axis.set_xticks(positions, [str(s) for s in steps])
        axis.set_xlabel("QAT steps per pair")
        axis.grid(alpha=0.3)
    save_png(figure, path)


# --- measuring --------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of the CSV: a last line without its newline was torn by a kill, and is
    measured again (the next append drops it from the file)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1], newline="")))


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """One measured row, appended and flushed: a kill loses at most the row being written (a torn
    line is dropped by the next append)."""
    from lightning_nas.files import append_line, write_text

    if not path.is_file():
        write_text(path, ",".join(COLUMNS) + "\n")  # whole or absent, never a torn header
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([row[c] for c in COLUMNS])
    append_line(path, buffer.getvalue())


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(supernet task, data module, quantized collector, fp32 collector, settings) from the
    checkpoint and the recipe; the space is the checkpoint's."""
    from lightning_nas.callbacks.pairs import AccuracyPairCollector, QuantizedPairCollector
    from lightning_nas.recipe.loader import load_recipe
    from lightning_nas.registry import DATA
    from lightning_nas.tasks.supernet import SupernetTask

    task = SupernetTask.from_checkpoint_file(args.checkpoint, "--checkpoint")
    space = dict(task.hparams.space)
    recipe = args.recipe or RECIPES[args.data]
    overrides = [f"space={json.dumps(space)}", f"task.init_checkpoint={args.checkpoint}"]
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    config = load_recipe(recipe, [*overrides, *args.overrides], validate=False).config
    pairs = (config.get("callbacks") or {}).get("pairs") or {}
    if not str(pairs.get("class_path", "")).endswith("QuantizedPairCollector"):
        raise SystemExit(f"{recipe} has no callbacks.pairs QuantizedPairCollector to take the settings from")
    # what a pair's numbers depend on: not the plan's size, store or length, nor how the target was named
    init = {k: v for k, v in (pairs.get("init_args") or {}).items()
            if k not in ("num_pairs", "store", "seed", "write_every", "allow_mixed_targets", "finetune_steps",
                         "target")}
    collector = QuantizedPairCollector(**init, target=args.target, finetune_steps=max(args.steps))
    fp32 = AccuracyPairCollector(bn_images=collector.bn_images, eval_images=collector.eval_images,
                                 batch_size=collector.batch_size)
    datamodule = DATA.build(config["data"])
    datamodule.setup("fit")
    settings = {"recipe": str(recipe), "space": space, "data": config["data"], "collector": init,
                "target": collector.target}
    return task, datamodule, collector, fp32, settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lightning_nas.callbacks.pairs import plan_rng, split_holdout, state_hash
    from lightning_nas.files import write_json

    torch.set_num_threads(args.threads)
    task, datamodule, collector, fp32, settings = load_setup(args)
    checkpoint = state_hash(task.supernet)
    fingerprint = settings_hash({**settings, "checkpoint_hash": checkpoint, "seed": args.seed})
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / CSV_FILE
    rows = read_rows(csv_path)
    foreign = {r["settings"] for r in rows} - {fingerprint}
    if foreign:
        raise SystemExit(f"{csv_path} holds a curve measured with other settings (supernet, recipe, target or "
                         "seed): choose another --out or remove it")
    done = {(int(r["pair"]), r["steps"]) for r in rows}
    lengths = [*args.steps, FP32]
    todo = [(i, s) for i in range(args.pairs) for s in lengths if (i, str(s)) not in done]
    bn_batches, eval_batches = split_holdout(datamodule, collector.bn_images, collector.eval_images,
                                             collector.batch_size)
    started = time.perf_counter()
    collector.finetune_batches(datamodule, max(args.steps))  # drawn once, outside every pair's time
    batches_seconds = time.perf_counter() - started
    saved = {k: v.clone() for k, v in task.supernet.state_dict().items()}
    columns = [TextColumn("QAT-length curve"), BarColumn(), MofNCompleteColumn(),
               TextColumn("pair {task.fields[pair]}, {task.fields[steps]}"), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task("curve", total=len(todo), pair="-", steps="-")
        for index, steps in todo:
            progress.update(bar, pair=index, steps=steps if steps == FP32 else f"{steps} steps")
            # the same random state (dropout) for every length: a shorter finetuning is a prefix of a longer one
            torch.manual_seed(args.seed * 1_000_003 + index)
            pair_started = time.perf_counter()
            if steps == FP32:
                pair = fp32.measure(task, datamodule, plan_rng(args.seed, index), bn_batches, eval_batches)
            else:
                pair = collector.measure(task, datamodule, plan_rng(args.seed, index), bn_batches, eval_batches,
                                         finetune_steps=steps)
            row = {"settings": fingerprint, "checkpoint_hash": checkpoint, "target": collector.target,
                   "seed": args.seed, "pair": index, "kind": "fp32" if steps == FP32 else "quant", "steps": steps,
                   "top1": pair["top1"], "loss": pair["loss"], "seconds": time.perf_counter() - pair_started,
                   "resolution": pair["resolution"], "arch": json.dumps(pair["arch"], sort_keys=True),
                   "policy": json.dumps(pair["policy"], sort_keys=True)}
            append_row(csv_path, row)
            progress.update(bar, advance=1)
    task.supernet.load_state_dict(saved)
    rows = [r for r in read_rows(csv_path) if int(r["pair"]) < args.pairs]
    summary = summarise(rows, args.steps, args.threshold)
    if summary["complete_pairs"] < 2:
        raise SystemExit(f"{csv_path} holds fewer than 2 pairs measured at every length")
    report = {"checkpoint": str(args.checkpoint), "checkpoint_hash": checkpoint,
              "checkpoint_sha256": hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest(),
              "target": collector.target, "seed": args.seed, "steps": args.steps, "settings": settings,
              "threads": torch.get_num_threads(), "finetune_batches_seconds": batches_seconds,
              "measured_now": len(todo), **summary}
    write_json(args.out / SUMMARY_FILE, report)
    plot(rows, summary, args.out / PLOT_FILE)
    print(markdown(summary))
    return report


if __name__ == "__main__":
    main()
