"""Where do SpaceEvo's int8 sub-stage rows lose whole-network latency?

For whole subnets made of the rows of a profiled table (the subnets of the profile's
self-validation, :func:`lightning_nas.hardware.spaceevo_latency.validation_subnets`), this times,
in passes over all of them (1 thread, batch 1, on the table's target):

* ``whole``: the int8 network, float in and float out;
* ``stages_alone``: the sum over its stages of each stage extracted from that network and timed
  alone on its real input (the previous stage's *active* width), int8 in and out, plus the stem and
  head timed alone the same way: what the network costs if nothing happens between its parts;
* ``stages_in_pairs``: the stem alone, then each stage (and the head) as the difference between
  the chain of its predecessor and itself and the predecessor alone: every part timed right after
  the part before it, as in the network;
* ``rows``: the table's prediction (stem + rows + head), whose rows were timed with the previous
  stage's *largest* width and other random weights.

``rows`` vs ``stages_alone`` is the price of the table's keying (input width, another module's
calibration); ``stages_alone`` vs ``whole`` is what running the parts in one network adds
(boundaries between stages, caches, the engine's reorders). Prints the ratios and Spearman of
each against ``whole``. Example::

    python benchmarks/spaceevo_latency_context.py --table runs/latency_lut_spaceevo/spaceevo_latency.csv \
        --subnets 12 --rounds 3 --json runs/latency_lut_spaceevo/context.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nas.hardware import profiling  # noqa: E402
from lightning_nas.hardware.latency_validation import spearman, time_in_passes  # noqa: E402
from lightning_nas.hardware.spaceevo_latency import (  # noqa: E402
    head_module,
    read_latency_rows,
    substage_key,
    validation_network,
    validation_subnets,
)
from lightning_nas.spaces.spaceevo_space import layout_from_hparams  # noqa: E402
from lightning_nas.targets import resolve_target  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, required=True, help="spaceevo_latency.csv of lightning-nas profile")
    parser.add_argument("--subnets", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="passes over all subnets")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="the validation subnets' seed")
    parser.add_argument("--json", type=Path, default=None, help="write the per-subnet figures here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    meta = json.loads(args.table.with_name(args.table.name + ".meta.json").read_text(encoding="utf-8"))
    layout = layout_from_hparams(meta["layout"])
    target = resolve_target(meta["target"])
    threads, overhead = int(meta["threads"]), float(meta.get("overhead_ms") or 0.0)
    rows = read_latency_rows(args.table)
    latency = {substage_key(r): float(r["latency_ms"]) for r in rows}
    picked = validation_subnets(layout, rows, args.subnets, args.seed)
    runners, stage_rows_of = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for i, (choice, stage_rows) in enumerate(picked):
            net, x = validation_network(layout, choice, stage_rows, seed=i)
            with torch.no_grad():
                features = net.forward_stages(x)

            def runner(module: torch.nn.Module, inputs: torch.Tensor, **strip: bool):
                return profiling.runner_for(module, inputs, "int8", target, threads=threads, workdir=workdir, **strip)

            named = {"whole": runner(net, x), "stem": runner(net.stem, x, strip_output=True),
                     "head": runner(head_module(net), features[-1], strip_input=True)}
            parts = [net.stem, *net.stages, head_module(net)]
            for s, stage in enumerate(net.stages):
                named[f"stage{s}"] = runner(stage, features[s], strip_input=True, strip_output=True)
            for k in range(1, len(parts)):  # part k after part k - 1; the input is part k - 1's
                last = k == len(parts) - 1
                pair_input = x if k == 1 else features[k - 2]
                named[f"pair{k}"] = runner(torch.nn.Sequential(parts[k - 1], parts[k]), pair_input,
                                           strip_input=k > 1, strip_output=not last)
            runners.append(named)
            stage_rows_of.append(stage_rows)
        samples = time_in_passes(runners, threads=threads, warmup=args.warmup, repeats=args.repeats,
                                 rounds=args.rounds, report=print)
    per_subnet = []
    for (choice, _), stage_rows, timings in zip(picked, stage_rows_of, samples):
        med = {name: statistics.median(t.median for t in ts) for name, ts in timings.items()}
        fixed = max(med["stem"] - overhead, 0.0) + max(med["head"] - overhead, 0.0)
        alone = [max(med[f"stage{s}"] - overhead, 0.0) for s in range(layout.num_stages)]
        table = [latency[substage_key(r)] for r in stage_rows]
        # part k's cost after part k - 1: the pair less the predecessor alone (stem, stages, head)
        alone_parts = [med["stem"], *(med[f"stage{s}"] for s in range(layout.num_stages)), med["head"]]
        in_pairs = med["stem"] + sum(med[f"pair{k}"] - alone_parts[k - 1] for k in range(1, len(alone_parts)))
        per_subnet.append({"space": choice.id, "whole_ms": med["whole"],
                           "stages_alone_ms": sum(alone) + fixed + overhead, "rows_ms": sum(table) + fixed + overhead,
                           "stages_in_pairs_ms": in_pairs,
                           "stage_alone_ms": alone, "stage_rows_ms": table, "fixed_ms": fixed})
    whole = [r["whole_ms"] for r in per_subnet]
    summary = {"target": target.name, "subnets": len(per_subnet), "rounds": args.rounds}
    for key in ("stages_alone_ms", "stages_in_pairs_ms", "rows_ms"):
        values = [r[key] for r in per_subnet]
        summary[key] = {"median_ratio_to_whole": statistics.median(v / w for v, w in zip(values, whole)),
                        "spearman_vs_whole": spearman(values, whole)}
    by_stage = [statistics.median(r["stage_rows_ms"][s] / r["stage_alone_ms"][s] for r in per_subnet
                                  if r["stage_alone_ms"][s] > 0) for s in range(layout.num_stages)]
    summary["median_row_to_alone_ratio_by_stage"] = by_stage
    return {"summary": summary, "subnets": per_subnet}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    result = run(args)
    s = result["summary"]
    print(f"{s['subnets']} whole subnets on {s['target']}, {s['rounds']} passes")
    for key, label in (("stages_alone_ms", "stem + stages alone + head"),
                       ("stages_in_pairs_ms", "parts after their predecessor"),
                       ("rows_ms", "stem + table rows + head")):
        f = s[key]
        print(f"{label:<28} / whole: median {f['median_ratio_to_whole']:.3f}, Spearman {f['spearman_vs_whole']:.3f}")
    print("table row / stage alone, median per stage:", " ".join(f"{v:.3f}" for v in s["median_row_to_alone_ratio_by_stage"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
