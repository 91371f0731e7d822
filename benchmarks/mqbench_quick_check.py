"""A quick look at a network before its mixed-precision benchmark: float top-1, then post-training
quantization (``lightning_nas.nn.ptq``, exactly as ``lightning-nas mqbench`` does it) of uniform
8 and 4 bits and of the benchmark's first configurations, on the first test images.

    python benchmarks/mqbench_quick_check.py runs/ofa_export_cifar10/subnet.pt --test-images 1000

Reads what ``mqbench.checkpoint`` reads (a classification checkpoint or an exported ``subnet.pt``);
the searchable layers are the model's ``block_layers()``, every other conv / linear layer is at
``--fixed-bits``. Prints one line per figure with its wall time.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("network", help="a classification checkpoint or a subnet.pt of `lightning-nas export`")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--bn-images", type=int, default=256)
    parser.add_argument("--holdout-size", type=int, default=5000, help="the training recipe's held-out split")
    parser.add_argument("--configs", type=int, default=3, help="benchmark configurations 0..N-1 (seed 0)")
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--fixed-bits", type=int, default=8)
    args = parser.parse_args()

    from lightning_nas.nn.evaluation import evaluate
    from lightning_nas.nn.ptq import PTQEvaluator
    from lightning_nas.registry import DATA
    from lightning_nas.stages.mqbench import (
        choose_layers,
        held_out,
        input_resolution,
        load_network,
        plan_config,
        test_batches,
    )

    datamodule = DATA.build({"name": "cifar10", "root": args.data_root, "batch_size": args.bn_images,
                             "eval_batch_size": 500, "num_workers": 0, "holdout_size": args.holdout_size,
                             "augment": False, "val_subset": args.test_images})
    datamodule.setup("fit")
    network = load_network(args.network, "network")
    resolution = input_resolution(network, datamodule, "network")
    tests = test_batches(datamodule, resolution)
    started = time.perf_counter()
    top1, loss = evaluate(network.model, tests)
    print(f"float: top-1 {top1:.2f} %, loss {loss:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    layers, fixed = choose_layers(network.model, None, "layers")
    print(f"{len(layers)} searchable layers, {len(fixed)} at {args.fixed_bits} bits: {', '.join(fixed)}", flush=True)
    bn_batches, _, _ = held_out(datamodule, args.bn_images, args.bn_images, resolution)
    evaluator = PTQEvaluator(network.model, layers, fixed, bn_batches, tests, fixed_bits=args.fixed_bits)
    configs = {"uniform 8": [8] * len(layers), "uniform 4": [4] * len(layers)}
    configs.update({f"benchmark config {i}": plan_config(0, i, len(layers), args.bit_choices)
                    for i in range(args.configs)})
    for name, bits in configs.items():
        started = time.perf_counter()
        top1, loss = evaluator.evaluate(bits)
        print(f"{name}: mean weight bits {sum(bits) / len(bits):.3f}, top-1 {top1:.2f} %, loss {loss:.4f} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
