"""Peak memory of one ProxylessNAS search step vs the number of candidates per layer.

Compares the binary-gate mixed op (one path with its graph, plus one output for the gate gradient)
with the all-paths DARTS-style mixed op (every path with its graph) at the same settings, with 2, 4
and 7 candidates per layer (7 = kernel 3/5/7 x expand 3/6 + zero; layers without shortcut have no
zero op). A *search step* is one weight step (training batch) plus one architecture step (held-out
batch, latency-regularised loss), exactly what :class:`~lightning_nas.tasks.proxyless.ProxylessSearchTask`
does per batch.

How memory is measured, and why. ATen allocates tensors with the C allocator, so ``tracemalloc``
(Python objects only) sees none of it, and ``ru_maxrss`` is the peak of the whole process life
(imports, weights, earlier steps). So every configuration runs in a fresh process with glibc told
to serve blocks >= 64 KiB by ``mmap`` and to give freed memory back at once
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so resident memory follows the live
tensors. Before each measured step the process collects garbage, trims the heap, reads its
resident size (``VmRSS``) and resets the kernel's peak (``VmHWM``, by writing 5 to
``/proc/self/clear_refs``); after the step ``VmHWM - VmRSS(before)`` is the step's peak *extra*
memory: activations kept for backward, gradients, temporaries. Weights and optimizer state
already exist before the step (warm-up steps create them), so they are not in it. As an
allocator-independent cross-check the same steps record the bytes of the distinct storages
autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``): the activation memory
proper.

Run (one thread; a few minutes)::

    .venv/bin/python benchmarks/proxyless_memory.py --out runs/proxyless_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CANDIDATE_SETS = {
    2: ["3x3_MBConv3", "3x3_MBConv6"],
    4: ["3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6"],
    7: ["3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6", "7x7_MBConv3", "7x7_MBConv6", "zero"],
}
#: The search recipe's space (recipes/proxylessnas.yaml) without its candidate list.
DEFAULT_SPACE = {"num_classes": 10, "resolution": 32, "width_mult": 0.5, "stem_stride": 2,
                 "stage_strides": [1, 2, 2, 1, 1, 1], "stage_depths": [2, 2, 2, 2, 2, 1]}


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as stream:
        stream.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def child(mode: str, candidates: int, batch_size: int, steps: int, space_args: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from lightning_nas.nn.builders import build_supernet
    from lightning_nas.spaces.proxyless import ProxylessSpace
    from lightning_nas.tasks.proxyless_costs import flops_table

    torch.set_num_threads(1)
    torch.manual_seed(0)
    libc = ctypes.CDLL("libc.so.6")
    space = ProxylessSpace.from_preset("proxyless_cifar", **space_args, candidate_ops=CANDIDATE_SETS[candidates])
    net = build_supernet(space, mode)
    table = flops_table(space)
    costs = [torch.tensor(row) for row in table.costs]
    target = 0.8 * (table.fixed + sum(sum(r) / len(r) for r in table.costs))
    weights = torch.optim.SGD(net.weight_param_groups(4e-5), lr=0.01, momentum=0.9, nesterov=True)
    arch = torch.optim.Adam(net.arch_parameters(), lr=6e-3, betas=(0.0, 0.999), eps=1e-8)
    size = space.resolution
    images = [torch.randn(batch_size, 3, size, size) for _ in range(2)]
    labels = torch.randint(0, space.num_classes, (batch_size,))
    generator = torch.Generator().manual_seed(0)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def search_step() -> int:
        """One weight step and one architecture step; returns the larger saved-for-backward bytes."""
        peaks = []
        # weight step
        saved.clear()
        if mode == "binary":
            net.sample_paths(generator)
        weights.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(net(images[0]), labels, label_smoothing=0.1)
        peaks.append(sum(saved.values()))
        loss.backward()
        weights.step()
        del loss
        # architecture step
        saved.clear()
        if mode == "binary":
            net.sample_pairs(generator)
        arch.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ce = F.cross_entropy(net(images[1]), labels)
            loss = ce * (torch.log(net.expected_cost(costs, table.fixed)) / torch.log(torch.tensor(target))) ** 0.3
        peaks.append(sum(saved.values()))
        loss.backward()
        if mode == "binary":
            net.accumulate_arch_grads()
        arch.step()
        if mode == "binary":
            net.rescale_arch()
        del loss, ce
        saved.clear()
        return max(peaks)

    for _ in range(3):  # creates optimizer state and lazily allocated buffers
        search_step()
    extra, activations = [], []
    for _ in range(steps):
        gc.collect()
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        _reset_peak()
        activations.append(search_step())
        extra.append(_status_kib("VmHWM") - before)
    params = sum(p.numel() for p in net.parameters())
    return {
        "mode": mode, "candidates": candidates, "batch_size": batch_size,
        "max_candidates_per_layer": max(len(layer.candidates) for layer in space.layers),
        "params_mb": params * 4 / 2**20,
        "step_peak_extra_mb": {"median": statistics.median(extra) / 1024, "max": max(extra) / 1024},
        "saved_activations_mb": {"median": statistics.median(activations) / 2**20, "max": max(activations) / 2**20},
        "rss_after_mb": _status_kib("VmRSS") / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="measured search steps per configuration")
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 7], choices=sorted(CANDIDATE_SETS))
    parser.add_argument("--modes", nargs="+", default=["binary", "all_paths"], choices=["binary", "all_paths"])
    parser.add_argument("--space", type=json.loads, default=DEFAULT_SPACE,
                        help="proxyless_cifar space arguments as JSON (default: the search recipe's space)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CANDIDATES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch_size, args.steps, args.space)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = []
    for mode in args.modes:
        for n in args.candidates:
            command = [sys.executable, __file__, "--child", mode, str(n), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--space", json.dumps(args.space)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{mode:9s} {n} candidates: step peak +{r['step_peak_extra_mb']['max']:.1f} MB "
                  f"(median {r['step_peak_extra_mb']['median']:.1f}), saved activations "
                  f"{r['saved_activations_mb']['max']:.1f} MB, params {r['params_mb']:.1f} MB", flush=True)
    print("\n| mixed op | candidates / layer | params (MB) | search-step peak extra RSS (MB, max of steps) "
          "| saved activations (MB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['candidates']} | {r['params_mb']:.1f} | {r['step_peak_extra_mb']['max']:.1f} "
              f"| {r['saved_activations_mb']['max']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {"batch_size": args.batch_size, "steps": args.steps,
                                                     "space": args.space}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
