"""Training-step throughput of the OFA MobileNetV3 supernet.

Three modes, each a full training step (forward, backward, SGD Nesterov step) on a batch of
random images with the ImageNet layout (1000 classes):

* ``max``    - the largest subnet every step;
* ``random`` - a new uniformly random subnet every step;
* ``ps``     - a progressive-shrinking step: the largest network (a frozen copy, no grad) gives
  soft targets, then 4 random subnets each run forward + backward with CE + distillation and
  their gradients accumulate into one optimizer step.

Throughput is ``batch / median(step time)`` after warm-up steps. Example::

    python benchmarks/supernet_throughput.py --res 32 --batch 64 --threads 2 --json out.json

On a machine shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP
threads that get descheduled make every parallel region wait, which can slow a 2-thread run by
an order of magnitude and hides the differences being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_nas.nn.builders import build_supernet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nas.nn.shrinking import shrinking_step  # noqa: E402
from lightning_nas.spaces.ofa_mbv3 import PRESETS, OFAMobileNetV3Space  # noqa: E402

MODES = ("max", "random", "ps")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, default=32, help="input resolution")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--subnets", type=int, default=4, help="subnets per step in ps mode")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC activations and weights (faster oneDNN depthwise / pointwise kernels on CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the supernet (recompiles per shape)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                        help="bf16-mixed: forward and loss under torch.autocast(bfloat16), as Lightning's")
    parser.add_argument("--space", choices=sorted(PRESETS), default="ofa_mbv3",
                        help="the ImageNet layout or the CIFAR-sized one (stride-1 stem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def _timed(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    space = OFAMobileNetV3Space.from_preset(args.space, num_classes=args.num_classes)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    supernet = build_supernet(space).to(device=device, memory_format=memory_format).train()
    model = torch.compile(supernet) if args.compile else supernet
    optimizer = torch.optim.SGD(supernet.param_groups(3e-5), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(
        memory_format=memory_format
    )
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    teacher = copy.deepcopy(supernet).requires_grad_(False)
    teacher.set_max()
    # the reference runs its teacher in train mode (batch statistics) under no_grad
    teacher.train()

    def step_single(config_for_step):
        def step(i: int) -> None:
            supernet.set_active(config_for_step(i))
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            loss.backward()
            optimizer.step()

        return step

    def step_ps(i: int) -> None:
        rng = random.Random(i)
        configs = [space.sample(rng) for _ in range(args.subnets)]
        with torch.no_grad(), autocast:
            teacher_logits = teacher(images)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            shrinking_step(model, images, labels, configs, teacher_logits, kd_ratio=1.0, label_smoothing=0.1)
        optimizer.step()

    steps = {
        "max": step_single(lambda i: space.largest()),
        "random": step_single(lambda i: space.sample(random.Random(i))),
        "ps": step_ps,
    }
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in steps:
            raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
        times = _timed(steps[mode], args.warmup, args.steps, device)
        median = statistics.median(times)
        results.append(
            {
                "mode": mode,
                "images_per_s": args.batch / median,
                "step_s_median": median,
                "step_s_min": min(times),
                "batch": args.batch,
                "res": args.res,
                "threads": args.threads,
                "channels_last": args.channels_last,
                "compile": args.compile,
                "device": str(device),
                "precision": args.precision,
                "space": args.space,
            }
        )
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    results = run(args)
    print(f"{'mode':<8} {'images/s':>10} {'median step (s)':>16}")
    for r in results:
        print(f"{r['mode']:<8} {r['images_per_s']:>10.1f} {r['step_s_median']:>16.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
