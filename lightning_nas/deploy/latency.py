"""Wall-clock latency of a model on this machine's CPU: fp32 vs real int8 (torch and onnxruntime).

Numbers are per forward call (one batch), in milliseconds, with a fixed number of intra-op threads
so that runs are comparable; the caller writes the returned dict to ``latency.json``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


@contextmanager
def _torch_threads(threads: int | None):  # noqa: ANN202 - context manager
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(
    fn: Callable[[Any], Any] | nn.Module,
    example_input: Any,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = 1,
) -> dict[str, float]:
    """Time ``fn(example_input)``: median, mean, std, p90, min in ms over ``repeats`` calls.

    A module is put in eval mode and run under ``torch.inference_mode``. ``threads`` sets torch's
    intra-op threads for the measurement (restored afterwards); ``None`` keeps the current setting.
    For an onnxruntime session pass a callable and set the threads on the session.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if isinstance(fn, nn.Module):
        fn.eval()
    times: list[float] = []
    with _torch_threads(threads), torch.inference_mode():
        for _ in range(max(warmup, 0)):
            fn(example_input)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(example_input)
            times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "std_ms": statistics.pstdev(times),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": min(times),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads if threads is not None else torch.get_num_threads(),
    }


def compare_fp32_int8(
    fp32_model: nn.Module,
    int8_model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    onnx_path: str | Path | None = None,
    warmup: int = 10,
    repeats: int = 50,
    threads: int = 1,
) -> dict[str, Any]:
    """Latency of the float model, its torch int8 conversion and (optionally) the ONNX QDQ export.

    ``input_shape`` is one sample's shape (e.g. ``(3, 224, 224)``). Returns a JSON-able dict::

        {"device": {...}, "threads": 1, "input_shape": [...],
         "results": {"fp32": {"batch_1": {...}, "batch_32": {...}}, "int8": {...}, "onnx_int8": {...}},
         "speedup_int8": {"batch_1": 2.1, ...}, "speedup_onnx_int8": {...}}
    """
    from lightning_nas.deploy.int8 import onnx_session

    runners: dict[str, Callable[[torch.Tensor], Any]] = {
        "fp32": fp32_model.eval(),
        "int8": int8_model.eval(),
    }
    if onnx_path is not None:
        session = onnx_session(onnx_path, threads=threads)
        name = session.get_inputs()[0].name
        runners["onnx_int8"] = lambda x: session.run(None, {name: x.numpy()})

    results: dict[str, dict[str, Any]] = {key: {} for key in runners}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape)
        for key, run in runners.items():
            stats = measure_latency(run, x, warmup=warmup, repeats=repeats, threads=threads)
            stats["images_per_s"] = batch * 1000.0 / stats["median_ms"]
            results[key][f"batch_{batch}"] = stats

    report: dict[str, Any] = {
        "device": {
            "machine": platform.machine(),
            "processor": platform.processor() or _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "quantized_engine": torch.backends.quantized.engine,
        },
        "threads": threads,
        "input_shape": list(input_shape),
        "results": results,
    }
    for key in runners:
        if key == "fp32":
            continue
        report[f"speedup_{key}"] = {
            b: results["fp32"][b]["median_ms"] / results[key][b]["median_ms"] for b in results["fp32"]
        }
    return report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
