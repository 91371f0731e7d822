"""Pick the hand-designed baseline for a ProxylessNAS result: the timm MobileNetV2 of closest latency.

Measures, in one process and on this CPU (batch 1, one thread, median of ``--repeats`` runs after
warm-up), the derived architecture of a search (``derived_arch.json``) and timm's MobileNetV2 at
every width in ``--widths``, each with ImageNet strides (1x1 maps at the end on 32x32 inputs) and
with ``output_stride=8`` (dilated, the 4x4 maps of the CIFAR-sized search space). Prints the
table and the baseline closest in latency, as the recipe overrides that train it::

    python benchmarks/proxyless_baseline.py --arch RUNS/proxylessnas_cifar10/derived_arch.json \\
        --out runs/benchmarks/proxyless_baseline.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=Path, required=True, help="derived_arch.json of a ProxylessNAS search")
    parser.add_argument("--widths", default="035,050,075,100", help="timm mobilenetv2_<width> variants")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    from lightning_nas.deploy.latency import measure_latency
    from lightning_nas.tasks.models import timm_model
    from lightning_nas.tasks.proxyless_models import proxyless_derived

    torch.manual_seed(0)
    x = torch.randn(1, 3, args.resolution, args.resolution)
    rows = []

    def measure(name: str, model: torch.nn.Module, overrides: list[str]) -> None:
        timing = measure_latency(model, x, warmup=args.warmup, repeats=args.repeats, threads=1)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "median_ms": timing["median_ms"], "p90_ms": timing["p90_ms"],
                     "params_m": params / 1e6, "overrides": overrides})
        print(f"{name:34s} {timing['median_ms']:7.3f} ms (p90 {timing['p90_ms']:.3f})  {params / 1e6:5.2f} M params",
              flush=True)

    measure("searched (derived_arch.json)", proxyless_derived(str(args.arch), num_classes=args.num_classes), [])
    for width in args.widths.split(","):
        arch = f"mobilenetv2_{width}"
        for stride in (None, 8):
            model = timm_model(arch, num_classes=args.num_classes, output_stride=stride)
            overrides = [f"task.model.arch={arch}"]  # of recipes/mobilenetv2_cifar10.yaml
            if stride is not None:
                overrides.append(f"task.model.output_stride={stride}")
            measure(f"{arch}" + (f" output_stride={stride}" if stride else ""), model, overrides)
    searched = rows[0]["median_ms"]
    baseline = min(rows[1:], key=lambda r: abs(r["median_ms"] - searched))
    report = {"resolution": args.resolution, "rows": rows, "searched_ms": searched, "baseline": baseline}
    print(f"\nclosest baseline: {baseline['model']} ({baseline['median_ms']:.3f} ms vs {searched:.3f} ms); "
          f"train it with: lightning-nas fit recipes/mobilenetv2_cifar10.yaml {' '.join(baseline['overrides'])}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
