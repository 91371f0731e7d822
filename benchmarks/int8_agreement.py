"""Real int8 vs fake-quantized top-1 agreement per deployment target, runtime and network.

For each data set (``digits``: all 359 test images; ``cifar10``: 1,000 test images, 100 per class,
drawn with a seeded generator) a fixed OFA MobileNetV3 subnet (``--subnet``: ``smallest`` or
``largest`` of ``ofa_mbv3_cifar``, 32x32) is trained in fp32 from scratch for ``--fp32-steps``
steps (1 thread), then finetuned with W8A8 QAT for each target (``QATTask``, ``--qat-steps``,
deployment-faithful output quantizers on). Every finetuned model is then converted for its target
(torch int8 with the target's engine, and the ONNX QDQ export run in ONNX Runtime) and compared
with its fake-quantized self. Trained files are cached under ``--out``, so a second run only
evaluates.

``--avx2-kernels`` evaluates once more in a subprocess with ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: torch's int8 kernels then run the AVX2 code (``vpmaddubsw``,
pairs of products saturating in int16) that a CPU without VNNI runs. ONNX Runtime's MLAS picks its
kernels by cpuid and has no such switch, so its rows always use this host's kernels.

    python benchmarks/int8_agreement.py --data digits cifar10 --data-root ../shared/data/cifar10 --avx2-kernels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_nas.nn.builders import build_subnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--targets", default="x86_vnni/torch,x86_avx2/torch")
    parser.add_argument("--subnet", default="smallest", choices=["smallest", "largest"])
    parser.add_argument("--fp32-steps", type=int, default=600)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=1000, help="CIFAR-10 test images (100 per class)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/int8_agreement"))
    parser.add_argument("--avx2-kernels", action="store_true", help="also evaluate with torch limited to AVX2")
    parser.add_argument("--ort-levels", action="store_true",
                        help="also ONNX Runtime at every graph optimisation level, with its batch-1 latency")
    parser.add_argument("--evaluate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _datamodule(name: str, root: str, batch_size: int):  # noqa: ANN202
    from lightning_nas.registry import DATA

    spec = {"name": name, "batch_size": batch_size, "num_workers": 0, "holdout_size": 1000 if name == "cifar10" else 200}
    if name == "cifar10":
        spec["root"] = root
    else:
        spec["image_size"] = 32
    data = DATA.build(spec)
    data.setup("fit")
    return data


def _test_images(data, name: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    images, labels = map(torch.cat, zip(*data.test_dataloader()))
    if name == "digits":
        return images, labels
    generator = torch.Generator().manual_seed(0)
    per_class = count // 10
    chosen = [torch.nonzero(labels == c).flatten() for c in range(10)]
    index = torch.cat([c[torch.randperm(len(c), generator=generator)[:per_class]] for c in chosen]).sort().values
    return images[index], labels[index]


def _train_fp32(data, steps: int, path: Path, subnet: str) -> None:  # noqa: ANN001
    """A fixed subnet trained from scratch (SGD, cosine), saved in `lightning-nas export`'s layout."""
    from lightning_nas.registry import SPACES

    space = SPACES.build(SPACE)
    config = space.canonical(getattr(space, subnet)())
    model = build_subnet(space, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.15)
    model.train()
    step, started = 0, time.perf_counter()
    while step < steps:
        for images, labels in data.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(data.normalize(images, config["r"])), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= steps:
                break
    print(f"fp32 training: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "space": SPACE, "state_dict": model.state_dict()}, path)


def _finetune(data, subnet_path: Path, target: str, steps: int, out: Path) -> None:  # noqa: ANN001
    import lightning.pytorch as pl

    from lightning_nas.tasks.qat import QATTask

    pl.seed_everything(0, verbose=False)
    task = QATTask(exported_subnet=str(subnet_path), policy=8, target=target, bn_recalibration_images=1000,
                   calibration_batch=200, lr=5e-3, freeze_bn_fraction=0.3, test_images=1000)
    trainer = pl.Trainer(default_root_dir=str(out), accelerator="cpu", max_steps=steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(task, datamodule=data)
    print(f"QAT for {target}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)


def _evaluate(args: argparse.Namespace) -> list[dict]:
    from lightning_nas.deploy.int8 import convert_to_int8, export_onnx, onnx_session, run_onnx, top1_agreement
    from lightning_nas.nn.metrics import percent_accuracy
    from lightning_nas.targets import resolve_target
    from lightning_nas.tasks.qat import QAT_SUBNET_FILE, load_qat_subnet

    rows = []
    for name in args.data:
        data = _datamodule(name, args.data_root, args.batch_size)
        images, labels = _test_images(data, name, args.images)
        calibration = [b[0] for b in data.holdout_dataloader(batch_size=200)]
        for target_name in args.targets.split(","):
            target = resolve_target(target_name)
            path = args.out / name / target.name.replace("/", "_") / QAT_SUBNET_FILE
            fake = load_qat_subnet(path)
            resolution = torch.load(path, map_location="cpu", weights_only=False)["config"]["r"]
            x = data.normalize(images, resolution)
            int8 = convert_to_int8(fake, [data.normalize(b, resolution) for b in calibration], target=target)
            with torch.no_grad():
                fake_logits = fake(x)
                logits = {"torch": int8(x)}
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = export_onnx(int8, x[:1], Path(tmp) / "m.onnx")
                session = onnx_session(onnx_path, threads=1)
                logits["onnxruntime"] = torch.from_numpy(run_onnx(session, x))
                if args.ort_levels and not args.evaluate_only:
                    _ort_levels(onnx_path, x, fake_logits, f"{name} {args.subnet}", target.name)
            for runtime, out in logits.items():
                rows.append({
                    "network": f"{name} {args.subnet}", "target": target.name, "runtime": runtime,
                    "deployed": runtime == target.runtime, "images": len(labels),
                    "agreement": top1_agreement(out, fake_logits),
                    "top1_fake_quant": float(percent_accuracy(fake_logits, labels)),
                    "top1_int8": float(percent_accuracy(out, labels)),
                    "torch_isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA") if runtime == "torch" else None,
                })
    return rows


def _ort_levels(path: Path, x: torch.Tensor, fake_logits: torch.Tensor, network: str, target: str) -> None:
    """Agreement and batch-1 latency of ONNX Runtime at each graph optimisation level: where its
    fused int8 kernels (QLinearConv, QLinearAdd, ...) replace dequantize -> float op -> quantize."""
    import onnxruntime as ort

    from lightning_nas.deploy.int8 import top1_agreement
    from lightning_nas.deploy.latency import measure_latency

    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = session.run(None, {name: x.numpy()})[0]
        ops = sorted({n.op_type for n in _optimized_graph(path, level)})
        fused = [op for op in ops if op.startswith("QLinear") or op in ("QGemm", "MatMulInteger", "ConvInteger")]
        latency = measure_latency(lambda b, s=session, n=name: s.run(None, {n: b}), x[:1].numpy(), warmup=5,
                                  repeats=30)
        print(f"ORT levels | {network} | {target} | {level} | {top1_agreement(logits, fake_logits):.1f} % "
              f"| {latency['median_ms']:.2f} ms | fused int8 ops: {', '.join(fused) or 'none'}", flush=True)


def _optimized_graph(path: Path, level: str):  # noqa: ANN202
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return list(onnx.load(options.optimized_model_filepath).graph.node)


def _print(rows: list[dict]) -> None:
    from lightning_nas.deploy.latency import _cpu_model, _int8_flags

    print(f"\nCPU: {_cpu_model()}, flags {' '.join(_int8_flags())}")
    print("| network | target | runtime | kernels | images | agreement | top-1 fake-quant | top-1 int8 |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        kernels = f"ISA limit {r['torch_isa_limit']}" if r["torch_isa_limit"] else "host"
        mark = "" if r["deployed"] else " (not its runtime)"
        print(f"| {r['network']} | {r['target']} | {r['runtime']}{mark} | {kernels} | {r['images']} "
              f"| {r['agreement']:.1f} % | {r['top1_fake_quant']:.2f} | {r['top1_int8']:.2f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    torch.set_num_threads(1)
    if args.evaluate_only:
        rows = _evaluate(args)
        args.json.write_text(json.dumps(rows))
        return rows
    from lightning_nas.targets import resolve_target
    from lightning_nas.tasks.qat import QAT_SUBNET_FILE

    for name in args.data:
        data = _datamodule(name, args.data_root, args.batch_size)
        subnet_path = args.out / name / "subnet.pt"
        if not subnet_path.is_file():
            _train_fp32(data, args.fp32_steps, subnet_path, args.subnet)
        for target_name in args.targets.split(","):
            target = resolve_target(target_name)
            out = args.out / name / target.name.replace("/", "_")
            if not (out / QAT_SUBNET_FILE).is_file():
                _finetune(data, subnet_path, target.name, args.qat_steps, out)
    rows = _evaluate(args)
    if args.avx2_kernels:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--evaluate-only",
                       "--json", str(Path(tmp) / "rows.json")]
            subprocess.run(command, env=env, check=True)
            rows += [r for r in json.loads((Path(tmp) / "rows.json").read_text()) if r["runtime"] == "torch"]
    _print(rows)
    return rows


if __name__ == "__main__":
    main()
