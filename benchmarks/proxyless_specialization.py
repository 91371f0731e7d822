"""ProxylessNAS specialisation: searching for this CPU's measured latency and for a FLOPs target
gives different architectures; how fast is each on this CPU?

Runs ``recipes/proxylessnas.yaml`` (or ``--recipe``) once per cost model (``task.cost=latency`` and
``task.cost=flops``, same seed, same everything else) into ``OUT/<cost>/``, then measures both
derived networks on this CPU in one process, alternating (batch 1, ``--threads``, median of
``--repeats``), and prints a table: ops per layer, MACs, parameters, the search's expected cost
and the measured latency. Extra recipe overrides go after ``--``::

    python benchmarks/proxyless_specialization.py --out runs/benchmarks/proxyless_specialization \\
        -- trainer.max_epochs=12 task.warmup_epochs=4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COSTS = ("latency", "flops")


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/proxylessnas.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/proxyless_specialization"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (median of medians)")
    p.add_argument("--smoke", action="store_true", help="run the recipe's smoke version (plumbing check)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    return p.parse_args(argv[: argv.index("--")] if "--" in argv else argv), extra


def search(args: argparse.Namespace, cost: str, extra: list[str]) -> dict:
    from lightning_nas.cli import main as cli

    run_dir = args.out / cost
    code = cli(["fit", args.recipe, f"run_dir={run_dir}", f"task.cost={cost}", *(["--smoke"] if args.smoke else []),
                *extra])
    if code != 0:
        raise SystemExit(f"the {cost} search failed (exit {code})")
    return json.loads((run_dir / "derived_arch.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    import statistics

    import torch

    from lightning_nas.deploy.latency import measure_latency

    args, extra = _parse(argv)
    records = {cost: search(args, cost, extra) for cost in COSTS}
    from lightning_nas.tasks.proxyless import load_derived_model

    models = {cost: load_derived_model(args.out / cost / "derived_model.pt") for cost in COSTS}
    resolution = int(records["latency"]["space"].get("resolution", 32))
    example = torch.randn(1, 3, resolution, resolution)
    medians: dict[str, list[float]] = {cost: [] for cost in COSTS}
    for _ in range(args.rounds):  # alternate, so drifts of a shared machine hit both alike
        for cost in COSTS:
            medians[cost].append(measure_latency(models[cost], example, warmup=20, repeats=args.repeats,
                                                 threads=args.threads)["median_ms"])
    rows = {}
    for cost in COSTS:
        record = records[cost]
        rows[cost] = {"ops": record["ops"], "macs": record["macs"], "params": record["params"],
                      # the search works in units of cost_scale; report the table's own units
                      "expected_cost": record["expected_cost"] / record["cost"]["scale"],
                      "derived_cost": record["derived_cost"] / record["cost"]["scale"],
                      "cost_unit": record["cost"]["unit"], "measured_ms": statistics.median(medians[cost]),
                      "measured_ms_rounds": medians[cost]}
    differing = sum(a != b for a, b in zip(rows["latency"]["ops"], rows["flops"]["ops"], strict=True))
    report = {"threads": args.threads, "batch": 1, "resolution": resolution, "layers_differing": differing,
              "overrides": extra, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("| searched for | MACs (M) | params (M) | derived cost (search's model) | measured latency, batch 1 |")
    print("|---|---:|---:|---:|---:|")
    for cost, r in rows.items():
        print(f"| {cost} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | {r['derived_cost']:.4g} {r['cost_unit']} "
              f"| {r['measured_ms']:.3f} ms |")
    print(f"\n{differing} of {len(rows['latency']['ops'])} layers differ")
    for cost, r in rows.items():
        print(f"{cost}: {' '.join(r['ops'])}")
    return report


if __name__ == "__main__":
    main()
