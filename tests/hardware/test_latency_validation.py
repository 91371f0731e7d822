"""The whole-subnet check of a latency table, on synthetic tables and measurements of known structure."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from lightning_nas.hardware import latency_validation
from lightning_nas.hardware.cost_models import LatencyTableCostModel
from lightning_nas.hardware.latency_keys import UnitDecomposition, space_units
from lightning_nas.hardware.latency_model import TableLatencyModel
from lightning_nas.hardware.latency_table import LatencyTable
from lightning_nas.hardware.latency_validation import (
    summarise,
    validate_table,
    validation_configs,
    validation_csv_path,
)
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

TINY = {"kernel_choices": [3, 5], "expand_choices": [3], "depth_choices": [2, 3]}


@pytest.fixture()
def tiny() -> OFAMobileNetV3Space:
    return OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", **TINY)


def write_table(space, path: Path, target: str = "x86_avx2/torch") -> Path:
    """A complete fp32 + int8 table whose units cost 0.1 ms x their position in the unit list."""
    units = space_units(space, [32])
    entries = {u.key: {"median": 0.1 * (i + 1), "mean": 0.1 * (i + 1)} for i, u in enumerate(units)}
    meta = {"device": "test", "threads": 1, "batch_size": 1, "resolutions": [32], "target": target}
    return LatencyTable(meta, {"fp32": entries, "int8": {k: {"median": v["median"] / 2} for k, v in entries.items()}}
                        ).save(path)


def test_summarise_known_figures() -> None:
    figures = summarise([1.1, 2.2, 2.7], [1.0, 2.0, 3.0])
    assert figures["spearman"] == pytest.approx(1.0)
    assert figures["median_abs_pct_error"] == pytest.approx(10.0)
    assert figures["mean_abs_pct_error"] == pytest.approx(10.0)
    assert figures["median_ratio_predicted_to_measured"] == pytest.approx(1.1)
    assert (figures["measured_ms_min"], figures["measured_ms_max"]) == (1.0, 3.0)
    assert summarise([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])["spearman"] == pytest.approx(-1.0)


def test_validation_configs_are_distinct_seeded_and_at_the_resolutions() -> None:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    configs = validation_configs(space, 20, [28, 32], seed=3)
    assert len(configs) == 20 and {c["r"] for c in configs} <= {28, 32}
    assert len({str(c) for c in configs}) == 20 and configs == validation_configs(space, 20, [28, 32], seed=3)
    assert configs != validation_configs(space, 20, [28, 32], seed=4)


def rows_for(space, table_path: Path, configs, scale: dict[str, float], noise: float = 0.0, reverse: bool = False):
    """Measurements of a known structure: the table's sum times ``scale`` (optionally reversed ranks)."""
    table = LatencyTable.load(table_path)
    rows = []
    rng = random.Random(0)
    for precision in ("fp32", "int8"):
        predicted = TableLatencyModel(space, table, precision, resolutions=[32]).evaluate(configs)
        values = list(predicted)
        if reverse:  # rank order flipped: the largest prediction is measured smallest
            ascending = sorted(predicted)
            for rank, i in enumerate(sorted(range(len(values)), key=lambda i: predicted[i])):
                values[i] = ascending[len(values) - 1 - rank]
        for i, value in enumerate(values):
            if len(rows) <= i:
                rows.append({"config": configs[i]})
            measured = float(value) * scale[precision] * (1 + noise * rng.uniform(-1, 1))
            rows[i][precision] = rows[i][f"{precision}_mean"] = measured
    return rows


def test_validate_table_writes_figures_into_the_table_and_a_csv(tiny, tmp_path: Path) -> None:
    path = write_table(tiny, tmp_path / "table.json")
    configs = validation_configs(tiny, 12, [32], seed=0)
    rows = rows_for(tiny, path, configs, {"fp32": 1.25, "int8": 0.8})
    result = validate_table(tiny, path, measured_rows=rows, min_spearman=0.9, max_median_abs_pct_error=30.0)
    assert result.passed and result.record["subnets"] == 12 and result.record["target"] == "x86_avx2/torch"
    fp32, int8 = result.figures("fp32"), result.figures("int8")
    assert fp32["spearman"] == pytest.approx(1.0) and int8["spearman"] == pytest.approx(1.0)
    assert fp32["median_abs_pct_error"] == pytest.approx(20.0)  # predicted = measured / 1.25
    assert int8["median_abs_pct_error"] == pytest.approx(25.0)  # predicted = measured / 0.8
    assert fp32["median_ratio_predicted_to_measured"] == pytest.approx(0.8)
    # written next to the table, read back
    saved = LatencyTable.load(path)
    assert saved.meta["validation"]["passed"] is True
    assert saved.meta["validation"]["precisions"]["int8"]["median_abs_pct_error"] == pytest.approx(25.0)
    with validation_csv_path(path).open(newline="") as handle:
        table_rows = list(csv.DictReader(handle))
    assert validation_csv_path(path).name == "table_validation.csv" and len(table_rows) == 2 * 12
    first = next(r for r in table_rows if r["precision"] == "fp32" and r["subnet"] == "0")
    assert float(first["measured_ms"]) == pytest.approx(1.25 * float(first["predicted_ms"]), rel=1e-4)
    assert float(first["abs_pct_error"]) == pytest.approx(20.0, rel=1e-3)
    # cost models built on the table carry its figures
    assert TableLatencyModel(tiny, saved, "int8", resolutions=[32]).validation["spearman"] == pytest.approx(1.0)
    model = LatencyTableCostModel({"name": "ofa_mbv3_cifar", **TINY}, str(path), precision="auto", resolutions=[32])
    assert set(model.validation) == {"fp32", "int8"} and model.validation["fp32"]["passed"] is True
    assert model.validation["fp32"]["subnets"] == 12 and model.validation["fp32"]["min_spearman"] == 0.9


def test_thresholds_fail_a_table_that_ranks_badly_or_errs_too_much(tiny, tmp_path: Path) -> None:
    path = write_table(tiny, tmp_path / "table.json")
    configs = validation_configs(tiny, 12, [32], seed=0)
    flipped = rows_for(tiny, path, configs, {"fp32": 1.0, "int8": 1.0}, reverse=True)
    result = validate_table(tiny, path, measured_rows=flipped, min_spearman=0.9)
    assert not result.passed and result.figures("fp32")["spearman"] < 0 and not result.figures("fp32")["passed"]
    assert LatencyTable.load(path).meta["validation"]["passed"] is False
    scaled = rows_for(tiny, path, configs, {"fp32": 2.0, "int8": 1.0})
    result = validate_table(tiny, path, measured_rows=scaled, min_spearman=0.9, max_median_abs_pct_error=10.0)
    assert result.figures("int8")["passed"] and not result.figures("fp32")["passed"]  # 50 % error
    assert validate_table(tiny, path, measured_rows=scaled, min_spearman=0.9).passed
    # an unvalidated table: the model says so
    plain = write_table(tiny, tmp_path / "plain.json")
    assert TableLatencyModel(tiny, LatencyTable.load(plain), resolutions=[32]).validation is None


def test_validation_measures_on_the_tables_target(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_table(tiny, tmp_path / "table.json", target="x86_avx2/onnxruntime")
    seen: dict = {}

    def fake_measure(space, configs, precisions, **kwargs):
        seen.update(kwargs, precisions=list(precisions))
        return [{"config": c, **{p: 1.0 + i for p in precisions}} for i, c in enumerate(configs)]

    monkeypatch.setattr(latency_validation, "measure_subnets", fake_measure)
    result = validate_table(tiny, path, subnets=5, precisions=["int8"], write=False)
    assert seen["target"].name == "x86_avx2/onnxruntime" and seen["precisions"] == ["int8"]
    assert seen["threads"] == 1 and seen["batch_size"] == 1 and result.record["subnets"] == 5
    assert not validation_csv_path(path).exists() and "validation" not in LatencyTable.load(path).meta


def test_measure_subnets_times_whole_networks(tiny) -> None:
    configs = validation_configs(tiny, 2, [32], seed=0)
    rows = latency_validation.measure_subnets(tiny, configs, ["fp32", "int8"], target="auto", warmup=0, repeats=2,
                                              rounds=2)
    assert [r["config"] for r in rows] == configs
    for row in rows:
        for p in ("fp32", "int8"):
            assert 0 < row[p] < 1000 and len(row[f"{p}_passes"]) == 2 and row[f"{p}_mean"] > 0
    assert UnitDecomposition(tiny).units(configs[0])  # the configs are subnets of the tiny space
