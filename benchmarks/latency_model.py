"""How well does the latency-table model predict whole-network latency on this machine?

1. Build (or resume, or reuse) the latency table of a space with the profiler
   (:func:`lightning_nas.hardware.latency_profile.profile_space`).
2. Sample random subnets, build each as a standalone network and measure its whole-network
   latency (fp32 eager, and int8 on the table's deployment target, as the table's units were),
   warm-up then the median of repeats (:mod:`lightning_nas.hardware.latency_validation`, the
   check ``lightning-nas profile`` ends with).
3. Predict each subnet's latency from the table (sum of its units) and report, per precision,
   Spearman's rank correlation and the median absolute percentage error (goal: >= 0.9, <= 10 %).

Example (1 thread, batch 1, 50 subnets; about 20 minutes on 2 busy cores)::

    python benchmarks/latency_model.py --table runs/latency/latency_table.json --realtime \
        --json runs/latency/validation.json

On a machine shared with other work, ``--realtime`` (root) keeps other processes from preempting
the measurements, and the rounds (``--rounds`` for the table, ``--net-rounds`` for the subnets)
spread every figure over the run, since such machines drift by tens of percent within minutes.

The table is resumable: an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nas.hardware.latency_model import TableLatencyModel  # noqa: E402
from lightning_nas.hardware.latency_profile import profile_space  # noqa: E402
from lightning_nas.hardware.latency_table import LatencyTable, cpu_name  # noqa: E402
from lightning_nas.hardware.latency_validation import measure_subnets, summarise, validation_configs  # noqa: E402
from lightning_nas.registry import SPACES  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="ofa_mbv3_cifar", help="registered space name")
    parser.add_argument("--table", type=Path, default=Path("runs/latency_model/latency_table.json"))
    parser.add_argument("--resolutions", type=int, nargs="*", default=None, help="default: the space's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--int8-backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--target", default=None,
                        help="deployment target whose engine times int8 (default: this host's for --int8-backend)")
    parser.add_argument("--context", default="network", choices=("network", "isolated"),
                        help="time table units inside profiling networks or each alone")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per table entry")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per table entry")
    parser.add_argument("--subnets", type=int, default=50)
    parser.add_argument("--net-warmup", type=int, default=5)
    parser.add_argument("--net-repeats", type=int, default=30)
    parser.add_argument("--net-rounds", type=int, default=3, help="passes over all subnets (median over passes)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the profiling networks (table)")
    parser.add_argument("--realtime", action="store_true",
                        help="time under SCHED_FIFO (root): other processes cannot preempt the measurements")
    parser.add_argument("--reuse-measurements", type=Path, default=None,
                        help="take the subnets and their measured latencies from an earlier --json report "
                             "(to compare tables on the same measurements)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures and every subnet's numbers here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    space = SPACES.build({"name": args.space})
    started = time.perf_counter()
    result = profile_space(space, args.table, resolutions=args.resolutions, batch_size=args.batch_size,
                           threads=args.threads, precisions=precisions, int8_backend=args.int8_backend,
                           warmup=args.warmup, repeats=args.repeats, context=args.context,
                           realtime=args.realtime, rounds=args.rounds, progress=sys.stderr.isatty(),
                           target=args.target)
    profile_seconds = time.perf_counter() - started
    print(f"table {args.table}: measured {result.measured}, reused {result.skipped} entries "
          f"({profile_seconds:.0f}s)", flush=True)
    table = LatencyTable.load(args.table)
    resolutions = args.resolutions or space.resolutions
    previous = None
    if args.reuse_measurements is not None:
        previous = json.loads(args.reuse_measurements.read_text(encoding="utf-8"))["rows"]
        configs = [row["config"] for row in previous]
    else:
        configs = validation_configs(space, args.subnets, resolutions, args.seed)
    predicted = {}
    for p in precisions:
        for stat in ("median", "mean"):
            model = TableLatencyModel(space, table, precision=p, stat=stat, resolutions=resolutions)
            predicted[p if stat == "median" else f"{p}_mean"] = [float(v) for v in model.evaluate(configs)]
    started = time.perf_counter()
    if previous is not None:
        keep = [*precisions, *(f"{p}_mean" for p in precisions)]
        rows = [{"config": row["config"], **{k: row[k] for k in keep}} for row in previous]
    else:
        rows = measure_subnets(space, configs, precisions, target=table.meta.get("target"), batch_size=args.batch_size,
                               threads=args.threads, warmup=args.net_warmup, repeats=args.net_repeats,
                               rounds=args.net_rounds, realtime=args.realtime,
                               report=lambda line: print(line, flush=True))
    for key, values in predicted.items():
        for row, value in zip(rows, values):
            row[f"{key}_predicted"] = value
    # headline: medians (table entries and whole networks); also means, which stay additive under
    # preemption by other processes when the machine is shared
    figures = {p: summarise(predicted[p], [row[p] for row in rows]) for p in precisions}
    figures_mean = {p: summarise(predicted[f"{p}_mean"], [row[f"{p}_mean"] for row in rows]) for p in precisions}
    report = {
        "device": cpu_name(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "space": args.space,
        "resolutions": list(resolutions),
        "int8_backend": args.int8_backend,
        "target": table.meta.get("target"),
        "realtime": bool(table.meta.get("realtime")),
        "context": args.context,
        "table": str(args.table),
        "table_entries": {p: len(table.keys(p)) for p in precisions},
        "table_repeats": args.repeats,
        "subnets": len(configs),
        "measurements_from": str(args.reuse_measurements) if args.reuse_measurements else None,
        "net_repeats": args.net_repeats,
        "net_rounds": args.net_rounds,
        "table_rounds": args.rounds,
        "profile_seconds": profile_seconds,
        "validation_seconds": time.perf_counter() - started,
        "figures": figures,
        "figures_mean": figures_mean,
        "rows": rows,
    }
    for p, f in [*figures.items(), *((f"{p} (means)", f) for p, f in figures_mean.items())]:
        print(f"{p}: Spearman {f['spearman']:.3f}, median |error| {f['median_abs_pct_error']:.1f}%, "
              f"mean |error| {f['mean_abs_pct_error']:.1f}%, predicted/measured {f['median_ratio_predicted_to_measured']:.3f}, "
              f"measured {f['measured_ms_min']:.2f}-{f['measured_ms_max']:.2f} ms")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
