"""int8 deployment of one fake-quantized subnet: conversion, ONNX export, agreement, latency.

:func:`deploy_int8` is what ``lightning-nas deploy`` (:mod:`lightning_nas.stages.deploy`) runs on
the subnet a QAT run finetuned: it converts the model to real int8 kernels
(:func:`~lightning_nas.deploy.int8.convert_to_int8`), exports the int8 model (QDQ) and its float
twin to ONNX, compares the top-1 of both runtimes' int8 models with the fake-quantized one on the
given images, times fp32 against int8 within each runtime
(:func:`~lightning_nas.deploy.latency.compare_fp32_int8`) and writes it all to ``latency.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_nas.deploy.int8 import convert_to_int8, export_onnx, onnx_session, run_onnx, top1_agreement
from lightning_nas.deploy.latency import compare_fp32_int8
from lightning_nas.files import write_text
from lightning_nas.nn.metrics import percent_accuracy
from lightning_nas.nn.quantize_model import remove_quantizers
from lightning_nas.targets import DeployTarget, host_can_run

LATENCY_FILE = "latency.json"
ONNX_FILE = "model_int8.onnx"
ONNX_FP32_FILE = "model_fp32.onnx"


def latency_steps(batch_sizes: Sequence[int]) -> int:
    """How many times :func:`deploy_int8` calls ``on_step``: conversion, export, agreement, and
    one latency measurement per runner (torch and ONNX Runtime, fp32 and int8) and batch size."""
    return 3 + 4 * len(batch_sizes)


@torch.no_grad()
def deploy_int8(
    fake: nn.Module,
    calibration: Sequence[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    target: DeployTarget,
    config: Mapping[str, Any],
    backend: str | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 10,
    repeats: int = 50,
    threads: int = 1,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Deploy the fake-quantized ``fake`` (a uniform 8-bit subnet with its quantizers, on the CPU,
    in eval mode) for ``target``; returns what it writes to ``out_dir/latency.json``.

    ``calibration``: normalised held-out batches for the int8 tensors no quantizer learned a range
    for; ``images`` / ``labels``: normalised test images the top-1 agreement is measured on.
    ``on_step(description)`` is called after each step (:func:`latency_steps` in all).
    """
    step = on_step or (lambda _: None)
    out_dir = Path(out_dir)
    fake = fake.cpu().eval()  # compared on the CPU, where int8 runs
    int8 = convert_to_int8(fake, calibration, backend=backend, target=target)
    step("converted to int8")
    onnx_path = export_onnx(int8, images[:1], out_dir / ONNX_FILE)
    float_model = copy.deepcopy(fake)
    remove_quantizers(float_model)
    onnx_fp32_path = export_onnx(float_model, images[:1], out_dir / ONNX_FP32_FILE)
    step("exported to ONNX")
    session = onnx_session(onnx_path, threads=threads)
    fake_logits, int8_logits = fake(images), int8(images)
    onnx_logits = torch.from_numpy(run_onnx(session, images))
    step("agreement measured")
    report = compare_fp32_int8(
        float_model,
        int8,
        tuple(images.shape[1:]),
        batch_sizes=batch_sizes,
        onnx_path=onnx_path,
        onnx_fp32_path=onnx_fp32_path,
        target=target.name,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        on_measured=lambda runner, batch: step(f"latency {runner} batch {batch}"),
    )

    def top1(logits: torch.Tensor) -> float:
        return float(percent_accuracy(logits, labels))

    deployed = "onnx_vs_fake_quant" if target.runtime == "onnxruntime" else "int8_vs_fake_quant"
    report.update(
        {
            "config": dict(config),
            "target": target.name,
            # a committed latency.json read on another CPU kind says so instead of misleading
            "target_native_on_host": host_can_run(target),
            "int8_backend": int8.engine,
            "weight_qmax": int8.weight_qmax,
            "agreement": {
                "images": len(labels),
                "int8_vs_fake_quant": top1_agreement(int8_logits, fake_logits),
                "onnx_vs_fake_quant": top1_agreement(onnx_logits, fake_logits),
                "onnx_vs_int8": top1_agreement(onnx_logits, int8_logits),
            },
            "deployed_runtime": target.runtime,
            "deployed_agreement": top1_agreement(
                onnx_logits if deployed == "onnx_vs_fake_quant" else int8_logits, fake_logits
            ),
            "top1": {
                "fake_quant": top1(fake_logits),
                "int8": top1(int8_logits),
                "onnx_int8": top1(onnx_logits),
            },
            "carried_ranges": len(int8.carried_ranges) + len(int8.carried_output_ranges),
            "calibrated_tensors": int8.calibrated_tensors,
            "onnx": str(onnx_path),
            "onnx_fp32": str(onnx_fp32_path),
        }
    )
    write_text(out_dir / LATENCY_FILE, json.dumps(report, indent=2))
    return report

