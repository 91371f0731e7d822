"""Wall-clock latency of a model on this machine's CPU: fp32 vs real int8, within torch and within ONNX Runtime.

Numbers are per forward call (one batch), in milliseconds, with a fixed number of intra-op threads
so that runs are comparable; the caller writes the returned dict to ``latency.json``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_nas.nn.threads import torch_threads


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
    with torch_threads(threads), torch.inference_mode():
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
    onnx_fp32_path: str | Path | None = None,
    warmup: int = 10,
    repeats: int = 50,
    threads: int = 1,
    target: str | None = None,
    on_measured: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Latency of fp32 against int8 within each runtime: torch fp32 vs torch int8 and, given the
    ONNX files, ONNX Runtime fp32 vs ONNX Runtime int8 (QDQ), so that no speed-up mixes a runtime
    with a number format.

    ``input_shape`` is one sample's shape (e.g. ``(3, 224, 224)``). ``target`` names the deployment
    target (default: this host's, torch runtime). ``on_measured(runner, batch_size)`` is called
    after each measurement (a progress display). Returns a JSON-able dict::

        {"device": {..., "isa": "x86_vnni", "cpu_flags": [...]}, "target": "x86_vnni/torch",
         "threads": 1, "input_shape": [...],
         "results": {"torch_fp32": {"batch_1": {...}, ...}, "torch_int8": {...},
                     "onnxruntime_fp32": {...}, "onnxruntime_int8": {...}},
         "speedup_torch_int8": {"batch_1": 2.1, ...}, "speedup_onnxruntime_int8": {...}}
    """
    from lightning_nas.deploy.int8 import onnx_session
    from lightning_nas.targets import detect_isa, resolve_target

    runners: dict[str, Callable[[torch.Tensor], Any]] = {
        "torch_fp32": fp32_model.eval(),
        "torch_int8": int8_model.eval(),
    }
    for key, path in (("onnxruntime_fp32", onnx_fp32_path), ("onnxruntime_int8", onnx_path)):
        if path is not None:
            session = onnx_session(path, threads=threads)
            name = session.get_inputs()[0].name
            runners[key] = lambda x, s=session, n=name: s.run(None, {n: x.numpy()})

    results: dict[str, dict[str, Any]] = {key: {} for key in runners}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape)
        for key, run in runners.items():
            stats = measure_latency(run, x, warmup=warmup, repeats=repeats, threads=threads)
            stats["images_per_s"] = batch * 1000.0 / stats["median_ms"]
            results[key][f"batch_{batch}"] = stats
            if on_measured is not None:
                on_measured(key, batch)

    report: dict[str, Any] = {
        "device": {
            "machine": platform.machine(),
            "processor": _cpu_model() if platform.machine() in ("x86_64", "AMD64") else platform.processor(),
            "isa": detect_isa(),
            "cpu_flags": _int8_flags(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "quantized_engine": torch.backends.quantized.engine,
        },
        "target": resolve_target(target or "auto").name,
        "threads": threads,
        "input_shape": list(input_shape),
        "results": results,
    }
    for runtime in ("torch", "onnxruntime"):
        fp32, int8 = f"{runtime}_fp32", f"{runtime}_int8"
        if fp32 in results and int8 in results:
            report[f"speedup_{runtime}_int8"] = {
                b: results[fp32][b]["median_ms"] / results[int8][b]["median_ms"] for b in results[fp32]
            }
    return report


def _int8_flags() -> list[str]:
    """The CPU flags that decide int8 arithmetic (VNNI, AVX-512, AVX2, AMX, ARM dot product)."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith(("flags", "Features")):
                    found = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in found]
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
