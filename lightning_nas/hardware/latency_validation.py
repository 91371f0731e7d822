"""Self-validation of a latency table: measure random whole subnets, compare with the table's sum.

A table is only as good as its sum of units predicts whole networks on the machine that measured
it. :func:`validate_table` draws ``subnets`` random subnets of the space (at the table's
resolutions), builds each as a standalone network, measures it whole (fp32 in torch eager; int8
converted and run on the table's deployment target, as the table's int8 units were, through
:mod:`.profiling`) in ``rounds`` passes over all subnets (a subnet's figure is the median over
passes: a shared machine drifts within minutes), predicts it from the table
(:class:`~.latency_model.TableLatencyModel`) and reports per precision Spearman's rank
correlation and the median absolute percentage error. The figures are written into the table
(``meta["validation"]``, read back by cost models built on it) and every subnet's predicted and
measured latency into a CSV next to the table (:func:`validation_csv_path`).

:func:`correct_table` then fits a learned correction of the sum (:mod:`.latency_correction`) on
further whole subnets, measured the same way but distinct from the validation subnets, and judges
it on the validation subnets only (``meta["correction"]``, ``<table>_correction.csv``).

``benchmarks/latency_model.py`` and ``lightning-nas profile`` both validate through this module.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_nas.files import write_text
from lightning_nas.hardware import profiling
from lightning_nas.hardware.latency_correction import (
    APPLY_MODES,
    MIN_FIT_SUBNETS,
    TooFewSubnets,
    feature_names,
    fit_correction,
    improved,
)
from lightning_nas.hardware.latency_model import TableLatencyModel
from lightning_nas.hardware.latency_table import LatencyTable, now

__all__ = [
    "CorrectionResult",
    "ValidationResult",
    "correct_table",
    "correction_csv_path",
    "fitting_configs",
    "judged",
    "measure_subnets",
    "spearman",
    "summarise",
    "time_in_passes",
    "validate_table",
    "validation_configs",
    "validation_csv_path",
]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant or has fewer than 2 values)."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def summarise(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """How ``predicted`` latencies match ``measured`` ones (errors in percent of the measured)."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    ratios = [p / m for p, m in zip(predicted, measured)]
    return {
        "spearman": spearman(predicted, measured),
        "median_abs_pct_error": 100.0 * statistics.median(errors),
        "mean_abs_pct_error": 100.0 * statistics.fmean(errors),
        "p90_abs_pct_error": 100.0 * sorted(errors)[int(0.9 * (len(errors) - 1))],
        "median_ratio_predicted_to_measured": statistics.median(ratios),
        "measured_ms_min": min(measured),
        "measured_ms_max": max(measured),
    }


def validation_configs(space: Any, subnets: int, resolutions: Sequence[int] | None = None,
                       seed: int = 0) -> list[dict]:
    """``subnets`` random subnets of ``space`` at ``resolutions`` (default: the space's), drawn from
    ``random.Random(seed)``; distinct while the space has enough of them."""
    wanted = set(space.resolutions if resolutions is None else resolutions)
    rng = random.Random(seed)
    configs: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(configs) < subnets:
        config = space.sample(rng)
        tries += 1
        if config["r"] not in wanted:
            if tries > 1000 * max(subnets, 1):
                raise ValueError(f"the space samples none of the resolutions {sorted(wanted)}")
            continue
        key = json.dumps(config, sort_keys=True)
        if key in seen and tries <= 100 * subnets:  # a tiny space repeats subnets: allow it then
            continue
        seen.add(key)
        configs.append(config)
    return configs


def time_in_passes(runners: Sequence[Mapping[str, tuple[Any, Any]]], *, threads: int = 1, warmup: int = 5,
                   repeats: int = 30, rounds: int = 3, realtime: bool = False,
                   report: Callable[[str], None] | None = None) -> list[dict[str, list[profiling.Timing]]]:
    """Time prepared ``(run, input)`` pairs (by name, one mapping per network) in ``rounds`` passes
    over all of them, so that every network is measured at several moments of the run; each pass is
    :func:`~.profiling.time_callable` (``warmup``, then the median of ``repeats``). Returns, per
    network and name, the pass timings in order."""
    samples: list[dict[str, list[profiling.Timing]]] = [{name: [] for name in r} for r in runners]
    for round_index in range(rounds):
        started = time.perf_counter()
        for i, named in enumerate(runners):
            for name, (run, x) in named.items():
                samples[i][name].append(profiling.time_callable(
                    run, x, warmup=warmup, repeats=repeats, threads=threads, realtime=realtime))
        if report is not None:
            report(f"whole-network pass {round_index + 1}/{rounds} ({time.perf_counter() - started:.0f}s)")
    return samples


def measure_subnets(space: Any, configs: Sequence[Mapping[str, Any]], precisions: Sequence[str], *,
                    target: Any = None, batch_size: int = 1, threads: int = 1, warmup: int = 5,
                    repeats: int = 30, rounds: int = 3, realtime: bool = False,
                    report: Callable[[str], None] | None = None) -> list[dict]:
    """Whole-network latency of every subnet (:func:`time_in_passes`): a subnet's figure is the
    median over passes (``<precision>``), with the mean over passes of the calls' means
    (``<precision>_mean``) and every pass's median (``<precision>_passes``). int8 runs on
    ``target`` (see :func:`~.profiling.runner_for`)."""
    import torch

    from lightning_nas.nn.builders import build_subnet

    with tempfile.TemporaryDirectory() as workdir:
        prepared = []
        for i, config in enumerate(configs):
            net = build_subnet(space, config).eval()
            x = torch.randn(batch_size, 3, config["r"], config["r"], generator=torch.Generator().manual_seed(i))
            prepared.append({precision: profiling.runner_for(net, x, precision, target, threads=threads,
                                                             workdir=workdir)
                             for precision in precisions})
        samples = time_in_passes(prepared, threads=threads, warmup=warmup, repeats=repeats, rounds=rounds,
                                 realtime=realtime, report=report)
    rows = []
    for config, per_precision in zip(configs, samples):
        row: dict[str, Any] = {"config": dict(config)}
        for precision, timings in per_precision.items():
            row[precision] = statistics.median(t.median for t in timings)
            row[f"{precision}_mean"] = statistics.fmean(t.mean for t in timings)
            row[f"{precision}_passes"] = [t.median for t in timings]
        rows.append(row)
    return rows


@dataclass
class ValidationResult:
    """What :func:`validate_table` measured: ``record`` is what the table stores."""

    record: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    csv_path: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.record["passed"])

    def figures(self, precision: str) -> dict[str, Any]:
        return self.record["precisions"][precision]


def validation_csv_path(table_path: str | os.PathLike[str]) -> Path:
    """Where the predicted-vs-measured CSV of a table goes: ``<table>_validation.csv`` beside it."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}_validation.csv")


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def validate_table(
    space: Any,
    table_path: str | os.PathLike[str],
    *,
    subnets: int = 30,
    precisions: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    target: Any = None,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 3,
    realtime: bool = False,
    seed: int = 0,
    stat: str = "median",
    min_spearman: float | None = None,
    max_median_abs_pct_error: float | None = None,
    configs: Sequence[Mapping[str, Any]] | None = None,
    measured_rows: Sequence[Mapping[str, Any]] | None = None,
    write: bool = True,
    report: Callable[[str], None] | None = None,
) -> ValidationResult:
    """Measure ``subnets`` random whole subnets and compare them with the table at ``table_path``.

    Batch size and threads are the table's (``meta``); ``target`` defaults to the table's recorded
    target (else this host's, for the table's int8 runtime); ``precisions`` to the table's;
    ``resolutions`` to the table's. A precision passes when its Spearman is at least
    ``min_spearman`` and its median absolute error at most ``max_median_abs_pct_error`` percent
    (each check only when given; a NaN Spearman fails). ``configs`` / ``measured_rows`` (rows of
    :func:`measure_subnets`) reuse earlier measurements instead of measuring. With ``write`` the
    record goes into the table's ``meta["validation"]`` and the rows into
    :func:`validation_csv_path`.
    """
    from lightning_nas.targets import resolve_target

    table_path = Path(table_path)
    table = LatencyTable.load(table_path)
    meta = table.meta
    precisions = list(table.precisions if precisions is None else precisions)
    resolutions = [int(r) for r in (resolutions or meta.get("resolutions") or space.resolutions)]
    if target is None:
        target = meta.get("target") or f"auto/{meta.get('int8_backend', 'torch')}"
    target = resolve_target(target)
    batch_size, threads = int(meta.get("batch_size", 1)), int(meta.get("threads", 1))
    if measured_rows is not None:
        configs = [dict(row["config"]) for row in measured_rows]
    elif configs is None:
        configs = validation_configs(space, subnets, resolutions, seed)
    predicted = {p: [float(v) for v in TableLatencyModel(space, table, precision=p, stat=stat,
                                                         resolutions=resolutions).evaluate(configs)]
                 for p in precisions}
    started = time.perf_counter()
    if measured_rows is None:
        rows = measure_subnets(space, configs, precisions, target=target, batch_size=batch_size, threads=threads,
                               warmup=warmup, repeats=repeats, rounds=rounds, realtime=realtime, report=report)
    else:
        rows = [dict(row) for row in measured_rows]
    measured_key = "" if stat == "median" else "_mean"
    figures: dict[str, dict[str, Any]] = {}
    for p in precisions:
        for row, value in zip(rows, predicted[p]):
            row[f"{p}_predicted"] = value
        figures[p] = judged(summarise(predicted[p], [row[f"{p}{measured_key}"] for row in rows]),
                             min_spearman, max_median_abs_pct_error)
    record = {
        "validated": now(),
        "subnets": len(configs),
        "seed": int(seed),
        "stat": stat,
        "target": target.name,
        "resolutions": resolutions,
        "warmup": int(warmup),
        "repeats": int(repeats),
        "rounds": int(rounds),
        "realtime": bool(realtime),
        "min_spearman": min_spearman,
        "max_median_abs_pct_error": max_median_abs_pct_error,
        "seconds": time.perf_counter() - started,
        "precisions": figures,
        "passed": all(f["passed"] for f in figures.values()),
    }
    result = ValidationResult(record, rows)
    if write:
        result.csv_path = _write_csv(validation_csv_path(table_path), rows, precisions, measured_key)
        record["csv"] = result.csv_path.name
        table = LatencyTable.load(table_path)  # what other writers added since
        table.meta["validation"] = record
        # a correction is judged on the validation subnets of its run: a new validation outdates it
        table.meta.pop("correction", None)
        table.merge_save(table_path)
    return result


def fitting_configs(space: Any, subnets: int, resolutions: Sequence[int], seed: int,
                    exclude: Sequence[Mapping[str, Any]] = ()) -> list[dict]:
    """Up to ``subnets`` distinct random subnets at ``resolutions``, none of them in ``exclude``
    (drawn from ``random.Random(seed)``; fewer where the space has too few others)."""
    wanted = set(resolutions)
    rng = random.Random(seed)
    seen = {json.dumps(dict(c), sort_keys=True) for c in exclude}
    configs: list[dict] = []
    for _ in range(200 * max(subnets, 1)):
        if len(configs) >= subnets:
            break
        config = space.sample(rng)
        key = json.dumps(config, sort_keys=True)
        if config["r"] in wanted and key not in seen:
            seen.add(key)
            configs.append(config)
    return configs


def correction_csv_path(table_path: str | os.PathLike[str]) -> Path:
    """Where the rows of a table's correction go: ``<table>_correction.csv`` beside it."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}_correction.csv")


@dataclass
class CorrectionResult:
    """What :func:`correct_table` fitted and how it did on the held-out subnets: ``record`` is
    what the table stores (``meta["correction"]``)."""

    record: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    csv_path: Path | None = None

    def figures(self, precision: str) -> dict[str, Any]:
        return self.record["precisions"][precision]


def correct_table(
    space: Any,
    table_path: str | os.PathLike[str],
    validation_rows: Sequence[Mapping[str, Any]],
    *,
    subnets: int,
    apply: str = "if_better",
    seed: int | None = None,
    measured_rows: Sequence[Mapping[str, Any]] | None = None,
    write: bool = True,
    report: Callable[[str], None] | None = None,
) -> CorrectionResult:
    """Fit a correction of the table's sum on ``subnets`` further whole subnets and judge it on the
    validated ones.

    The table must carry a validation (:func:`validate_table`); ``validation_rows`` are its rows
    (:attr:`ValidationResult.rows`). The fitting subnets are drawn with ``seed`` (default: the
    validation's seed + 1) among the subnets not validated, and measured as the validation measured
    its subnets (target, warm-up, repeats, rounds, priority, statistic: the validation record's);
    ``measured_rows`` (rows of :func:`measure_subnets`) reuse measurements instead. Per precision
    the record holds the fitted model, the held-out figures of the raw sum and of the corrected
    one (``held_out``: ``raw``, ``corrected``, each ``passed`` against the validation's
    thresholds), ``improved`` (:func:`~.latency_correction.improved`) and ``applied``: by ``apply``
    (``if_better``: when improved; ``always``; ``never``: recorded only). Cost models built on the
    table use a correction marked applied. With ``write`` the record goes into
    ``meta["correction"]`` and every subnet's numbers into :func:`correction_csv_path`.
    """
    if apply not in APPLY_MODES:
        raise ValueError(f"apply {apply!r} must be one of {list(APPLY_MODES)}")
    table_path = Path(table_path)
    table = LatencyTable.load(table_path)
    validation = table.meta.get("validation")
    if not isinstance(validation, dict):
        raise ValueError(f"{table_path} has no validation: validate the table first (its subnets judge the correction)")
    precisions = list(validation["precisions"])
    stat, resolutions = validation.get("stat", "median"), [int(r) for r in validation["resolutions"]]
    measured_key = "" if stat == "median" else "_mean"
    held_out = [dict(row) for row in validation_rows]
    if len(held_out) != validation["subnets"]:
        raise ValueError(f"got {len(held_out)} validation rows for a validation of {validation['subnets']} subnets")
    fit_seed = int(validation.get("seed", 0)) + 1 if seed is None else int(seed)
    started = time.perf_counter()
    if measured_rows is None:
        configs = fitting_configs(space, subnets, resolutions, fit_seed, exclude=[r["config"] for r in held_out])
        if len(configs) < MIN_FIT_SUBNETS:
            raise TooFewSubnets(f"the space has only {len(configs)} subnets besides the validated ones; a "
                                f"correction needs at least {MIN_FIT_SUBNETS}")
        from lightning_nas.targets import resolve_target

        fitted_rows = measure_subnets(
            space, configs, precisions, target=resolve_target(validation["target"]),
            batch_size=int(table.meta.get("batch_size", 1)), threads=int(table.meta.get("threads", 1)),
            warmup=int(validation["warmup"]), repeats=int(validation["repeats"]), rounds=int(validation["rounds"]),
            realtime=bool(validation["realtime"]), report=report)
    else:
        fitted_rows = [dict(row) for row in measured_rows]
    validated = {json.dumps(dict(r["config"]), sort_keys=True) for r in held_out}
    if any(json.dumps(dict(r["config"]), sort_keys=True) in validated for r in fitted_rows):
        raise ValueError("a fitting subnet is also a validation subnet: a correction is judged on unseen subnets only")
    fit_configs = [dict(r["config"]) for r in fitted_rows]
    val_configs = [dict(r["config"]) for r in held_out]
    thresholds = validation.get("min_spearman"), validation.get("max_median_abs_pct_error")
    figures: dict[str, dict[str, Any]] = {}
    for p in precisions:
        model = TableLatencyModel(space, table, precision=p, stat=stat, resolutions=resolutions)
        names = feature_names(model.units.decomposition)
        fit_table = model.evaluate_table(fit_configs)
        correction = fit_correction(model.features(fit_configs), fit_table,
                                    [r[f"{p}{measured_key}"] for r in fitted_rows], names)
        val_table = model.evaluate_table(val_configs)
        val_corrected = correction.apply(val_table, model.features(val_configs))
        measured = [r[f"{p}{measured_key}"] for r in held_out]
        raw = judged(summarise([float(v) for v in val_table], measured), *thresholds)
        corrected = judged(summarise([float(v) for v in val_corrected], measured), *thresholds)
        better = improved(raw, corrected)
        fit_corrected = correction.apply(fit_table, model.features(fit_configs))
        for rows, sums, values in ((fitted_rows, fit_table, fit_corrected), (held_out, val_table, val_corrected)):
            for row, table_value, value in zip(rows, sums, values):
                row[f"{p}_table"], row[f"{p}_corrected"] = float(table_value), float(value)
        figures[p] = {"model": correction.to_record(), "held_out": {"raw": raw, "corrected": corrected},
                      "improved": better, "applied": apply == "always" or (apply == "if_better" and better)}
    record = {
        "fitted": now(),
        "fit_subnets": len(fitted_rows),
        "held_out_subnets": len(held_out),
        "seed": fit_seed,
        "stat": stat,
        "apply": apply,
        "resolutions": resolutions,
        "seconds": time.perf_counter() - started,
        "precisions": figures,
    }
    result = CorrectionResult(record, [*({"role": "fit", **r} for r in fitted_rows),
                                       *({"role": "held_out", **r} for r in held_out)])
    if write:
        result.csv_path = _write_correction_csv(correction_csv_path(table_path), result.rows, precisions,
                                                measured_key)
        record["csv"] = result.csv_path.name
        table = LatencyTable.load(table_path)  # what other writers added since
        table.meta["correction"] = record
        table.merge_save(table_path)
    return result


def judged(summary: Mapping[str, float], min_spearman: float | None,
           max_median_abs_pct_error: float | None) -> dict[str, Any]:
    """Finite figures and ``passed`` against the validation's thresholds (as :func:`validate_table`)."""
    passed = not math.isnan(summary["spearman"])
    if min_spearman is not None:
        passed = passed and summary["spearman"] >= min_spearman
    if max_median_abs_pct_error is not None:
        passed = passed and summary["median_abs_pct_error"] <= max_median_abs_pct_error
    return {k: _finite(v) for k, v in summary.items()} | {"passed": passed}


def _write_correction_csv(path: Path, rows: Sequence[Mapping[str, Any]], precisions: Sequence[str],
                          measured_key: str) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subnet", "role", "precision", "resolution", "table_ms", "corrected_ms", "measured_ms", "config"])
    for i, row in enumerate(rows):
        for p in precisions:
            writer.writerow([i, row["role"], p, row["config"]["r"], f"{row[f'{p}_table']:.6g}",
                             f"{row[f'{p}_corrected']:.6g}", f"{row[f'{p}{measured_key}']:.6g}",
                             json.dumps(row["config"], separators=(",", ":"))])
    return write_text(path, buffer.getvalue())


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], precisions: Sequence[str], measured_key: str) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subnet", "precision", "resolution", "predicted_ms", "measured_ms", "abs_pct_error", "config"])
    for i, row in enumerate(rows):
        for p in precisions:
            predicted, measured = row[f"{p}_predicted"], row[f"{p}{measured_key}"]
            writer.writerow([i, p, row["config"]["r"], f"{predicted:.6g}", f"{measured:.6g}",
                             f"{100.0 * abs(predicted - measured) / measured:.4g}",
                             json.dumps(row["config"], separators=(",", ":"))])
    return write_text(path, buffer.getvalue())
