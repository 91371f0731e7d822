"""Quantization-aware finetuning of three subnets of a trained supernet, with int8 deployment.

For the smallest subnet, the largest and one in between (the sampled subnet whose MACs are closest
to the geometric mean of those two), this runs :class:`lightning_nas.tasks.qat.QATTask` from the
supernet checkpoint under three policies (the W8A8 subnet then deployed as ``lightning-nas deploy``
does it, :func:`lightning_nas.stages.deploy.deploy_qat_subnet`) and prints a markdown table:

* fp32 top-1: the extracted subnet after batch-norm recalibration, before any finetuning;
* W8A8: uniform 8-bit QAT, converted to real int8 kernels (torch onednn and onnxruntime QDQ), with
  the int8 top-1 agreement and speed-up over fp32 at batch 1 and 32 (one thread);
* mixed: the APQ policy over {4, 6, 8} whose MAC-weighted mean of weight and activation bits is
  closest to ``--mixed-bits`` (6), among ``--policy-samples`` seeded random policies;
* W4A4: uniform 4-bit (stem, first block, SE, head and classifier stay at 8 bits, as in APQ).

Meant for a CIFAR-10 supernet (``ofa_mbv3_cifar`` space)::

    python benchmarks/qat_cifar10.py --checkpoint runs/ofa_supernet_cifar10/checkpoints/last.ckpt \\
        --data cifar10 --data-root /path/to/cifar10 --epochs 30 --out runs/benchmarks/qat_cifar10

It runs on any supernet checkpoint and data module (``--data digits`` for the embedded set); a
quick check of the plumbing: ``--epochs 1 --limit-train-batches 3 --latency-repeats 5``.
Results also go to ``OUT/results.json``; every run keeps its ``qat_metrics.json`` and
``latency.json`` under ``OUT/<subnet>/<policy>``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nas.spaces.quant_policy import QuantPolicySpace  # noqa: E402

SUBNETS = ("smallest", "middle", "largest")
POLICIES = ("w8a8", "mixed", "w4a4")


def add_qat_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """The arguments :func:`run_qat` reads: supernet, data and the QAT schedule."""
    parser.add_argument("--checkpoint", required=checkpoint_required, help="supernet checkpoint (lightning-nas fit)")
    parser.add_argument(
        "--data", default="cifar10", help="registered data module name (cifar10, digits, ...)"
    )
    parser.add_argument("--data-root", default="data/cifar10", help="root of the cifar10 data module")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--holdout-size", type=int, default=2000, help="held-out training images (BN, ranges)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30, help="QAT epochs per run (APQ: 30)")
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bn-images", type=int, default=2000)
    parser.add_argument("--agreement-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=None,
                        help="evaluate top-1 on N test images, a seeded sample stratified by class (default: all)")
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_qat_arguments(parser)
    parser.add_argument("--mixed-bits", type=float, default=6.0, help="target mean bits of the mixed policy")
    parser.add_argument("--policy-samples", type=int, default=500)
    parser.add_argument("--subnet-samples", type=int, default=500, help="candidates for the middle subnet")
    parser.add_argument("--subnets", default=",".join(SUBNETS), help=f"a subset of {','.join(SUBNETS)}")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"a subset of {','.join(POLICIES)}")
    parser.add_argument("--out", default="runs/benchmarks/qat_cifar10")
    return parser.parse_args(argv)


def middle_subnet(space: Any, samples: int, seed: int) -> dict:
    """The sampled subnet whose MACs are closest (in log scale) to the geometric mean of the
    smallest and largest subnets' MACs."""
    target = math.sqrt(space.macs(space.smallest()) * space.macs(space.largest()))
    rng = random.Random(seed)
    candidates = [space.sample(rng) for _ in range(samples)]
    return min(candidates, key=lambda c: abs(math.log(space.macs(c) / target)))


def mixed_policy(space: Any, config: dict, target_bits: float, samples: int, seed: int) -> tuple[dict, float]:
    """The random APQ policy whose MAC-weighted mean bits ((weight + activation) / 2) on this
    subnet are closest to ``target_bits``, and that mean."""
    policies = QuantPolicySpace()
    specs = space.layer_specs(config)
    rng = random.Random(seed)
    best, best_bits = None, float("inf")
    for _ in range(samples):
        policy = policies.sample(rng, space.num_blocks)
        bits = sum(policies.average_bits(policy, specs)) / 2
        if best is None or abs(bits - target_bits) < abs(best_bits - target_bits):
            best, best_bits = policy, bits
    assert best is not None
    return best, best_bits


def run_qat(args: argparse.Namespace, config: dict, policy: int | dict, deploy: bool, run_dir: Path) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_nas.registry import DATA
    from lightning_nas.tasks.qat import QAT_METRICS_FILE, QAT_SUBNET_FILE, QATTask

    pl.seed_everything(args.seed, verbose=False)
    data_spec: dict[str, Any] = {
        "name": args.data,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "holdout_size": args.holdout_size,
    }
    if args.data == "cifar10":
        data_spec["root"] = args.data_root
    datamodule = DATA.build(data_spec)
    task = QATTask(
        supernet_checkpoint=args.checkpoint,
        subnet=config,
        policy=policy,
        lr=args.lr,
        bn_recalibration_images=args.bn_images,
        deploy=deploy,
        test_images=args.test_images,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        default_root_dir=str(run_dir),
        accelerator=args.accelerator,
        devices=1,
        logger=CSVLogger(str(run_dir), name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=datamodule)
    result = json.loads((run_dir / QAT_METRICS_FILE).read_text())
    if deploy:
        from lightning_nas.recipe.sections import DeploySettings
        from lightning_nas.stages.deploy import deploy_qat_subnet, read_record

        path = run_dir / QAT_SUBNET_FILE
        settings = DeploySettings(agreement_images=args.agreement_images, calibration_images=args.bn_images,
                                  latency_repeats=args.latency_repeats, progress=False)
        result["latency"] = deploy_qat_subnet(path, datamodule, run_dir, settings, task.target, read_record(path))
    return result


def table(rows: list[dict]) -> str:
    header = (
        "| subnet | MACs (M) | params (M) | fp32 top-1 | W8A8 top-1 | mixed top-1 (bits) | W4A4 top-1 "
        "| int8 / ONNX agreement | torch int8 vs fp32 b1 / b32 | ONNX Runtime int8 vs fp32 b1 / b32 |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for row in rows:
        first = next(row[p] for p in POLICIES if p in row)
        cells = [row["name"], f"{first['macs'] / 1e6:.1f}", f"{first['params'] / 1e6:.2f}", f"{first['fp32_top1']:.2f}"]
        cells.append(f"{row['w8a8']['test_top1']:.2f}" if "w8a8" in row else "-")
        cells.append(f"{row['mixed']['test_top1']:.2f} ({row['mixed_bits']:.2f})" if "mixed" in row else "-")
        cells.append(f"{row['w4a4']['test_top1']:.2f}" if "w4a4" in row else "-")
        if "w8a8" in row:
            deploy = row["w8a8"]["latency"]
            cells += [f"{deploy['agreement']['int8_vs_fake_quant']:.1f}% / "
                      f"{deploy['agreement']['onnx_vs_fake_quant']:.1f}%",
                      f"{deploy['speedup_torch_int8']['batch_1']:.2f}x / {deploy['speedup_torch_int8']['batch_32']:.2f}x",
                      f"{deploy['speedup_onnxruntime_int8']['batch_1']:.2f}x / "
                      f"{deploy['speedup_onnxruntime_int8']['batch_32']:.2f}x"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from lightning_nas.tasks.supernet import SupernetTask

    supernet = SupernetTask.from_checkpoint_file(args.checkpoint, "--checkpoint")
    space = supernet.space
    chosen_subnets, chosen_policies = args.subnets.split(","), args.policies.split(",")
    for given, allowed, flag in ((chosen_subnets, SUBNETS, "--subnets"), (chosen_policies, POLICIES, "--policies")):
        if not set(given) <= set(allowed):
            raise SystemExit(f"{flag}: {','.join(sorted(set(given) - set(allowed)))} unknown; allowed: {','.join(allowed)}")
    subnets = {
        "smallest": space.smallest(),
        "middle": middle_subnet(space, args.subnet_samples, args.seed),
        "largest": space.largest(),
    }
    subnets = {name: config for name, config in subnets.items() if name in chosen_subnets}
    del supernet
    out = Path(args.out)
    rows = []
    for name, config in subnets.items():
        started = time.perf_counter()
        policy, bits = mixed_policy(space, config, args.mixed_bits, args.policy_samples, args.seed)
        row = {"name": name, "config": config, "mixed_policy": policy, "mixed_bits": bits}
        runs = {"w8a8": (8, True), "mixed": (policy, False), "w4a4": (4, False)}
        for key in POLICIES:
            if key in chosen_policies:
                row[key] = run_qat(args, config, runs[key][0], runs[key][1], out / name / key)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"{name}: done in {row['seconds']:.0f}s", flush=True)
        # after every subnet: a killed run keeps what it finished
        (out / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
