"""Int8 latency rows of SpaceEvo sub-stages: sampling plan, CSV read back, resume, settings check."""

from __future__ import annotations

import csv
import json

import pytest

from lightning_nas.hardware.latency_table import LatencyTableError
from lightning_nas.hardware.spaceevo_latency import (
    cell_input,
    profile_substages,
    read_latency_rows,
    sample_substages,
    substage_key,
    validate_substage_rows,
    validation_subnets,
)
from lightning_nas.spaces.spaceevo_layout import CIFAR_LAYOUT, HeadSpec, MacroLayout, StageSpec, StemSpec
from lightning_nas.targets import host_target

TINY = MacroLayout(name="tiny", resolution=8, num_classes=10, stem=StemSpec(channels=8),
                   stages=(StageSpec(2, (8, 16)), StageSpec(1, (16, 24))), head=HeadSpec(channels=32),
                   block_types=("mbconv", "fused_mbconv"))


def test_sampling_is_seeded_distinct_and_covers_every_width() -> None:
    first = sample_substages(CIFAR_LAYOUT, 2, "mbconv_se", 6, seed=3)
    assert first == sample_substages(CIFAR_LAYOUT, 2, "mbconv_se", 6, seed=3)
    assert first != sample_substages(CIFAR_LAYOUT, 2, "mbconv_se", 6, seed=4)
    assert len(set(first)) == 6
    assert sorted(s.width for s in first) == list(CIFAR_LAYOUT.stages[2].widths)
    # a cell with fewer sub-stages than asked gives all of them once: 6 widths x 3 depths x 1 kernel x 2 expands
    everything = sample_substages(CIFAR_LAYOUT, 0, "fused_mbconv", 1000)
    assert len(everything) == len(set(everything)) == 36


def test_cell_input_is_the_previous_stage_largest_width() -> None:
    assert cell_input(CIFAR_LAYOUT, 0) == (24, 32)
    assert cell_input(CIFAR_LAYOUT, 3) == (112, 4)
    assert cell_input(TINY, 1) == (16, 4)


def test_torch_rows_are_written_and_a_resumed_run_measures_only_the_rest(tmp_path) -> None:
    output = tmp_path / "latency.csv"
    settings = dict(target=host_target("torch"), samples_per_cell=2, stages=[1], block_types=["mbconv"],
                    warmup=0, repeats=2, progress=False)
    first = profile_substages(TINY, output, limit=1, **settings)
    assert (first.measured, first.skipped, first.remaining) == (1, 0, 1)
    second = profile_substages(TINY, output, **settings)
    assert (second.measured, second.skipped, second.remaining) == (1, 1, 0)
    rows = read_latency_rows(output)
    planned = sample_substages(TINY, 1, "mbconv", 2)
    assert [substage_key(r) for r in rows] == [(1, "mbconv", s.width, s.depth, s.kernel, float(s.expand))
                                              for s in planned]
    for row in rows:
        assert (int(row["in_channels"]), int(row["in_size"])) == (16, 4)
        assert 0 < float(row["latency_ms"]) < 1000
    meta = json.loads((tmp_path / "latency.csv.meta.json").read_text())
    assert meta["target"] == host_target("torch").name and meta["repeats"] == 2
    third = profile_substages(TINY, output, **settings)
    assert (third.measured, third.skipped) == (0, 2)
    with pytest.raises(LatencyTableError, match="repeats"):
        profile_substages(TINY, output, **{**settings, "repeats": 3})


def test_onnxruntime_rows_take_off_the_session_overhead(tmp_path) -> None:
    output = tmp_path / "ort.csv"
    result = profile_substages(TINY, output, target=host_target("onnxruntime"), samples_per_cell=1, stages=[0],
                               block_types=["fused_mbconv"], warmup=1, repeats=3, progress=False)
    assert result.measured == 1 and result.meta["overhead_ms"] > 0
    (row,) = read_latency_rows(output)
    assert float(row["latency_ms"]) >= 0 and int(row["in_channels"]) == 8


def _rows(layout: MacroLayout, per_cell: int) -> list[dict]:
    """Unmeasured rows of every cell (latency 1 ms each), as read back from a CSV."""
    return [{"stage": str(stage), "block_type": block_type, "width": str(s.width), "depth": str(s.depth),
             "kernel": str(s.kernel), "expand": str(float(s.expand)), "latency_ms": "1.0"}
            for stage in range(layout.num_stages) for block_type in layout.block_types
            for s in sample_substages(layout, stage, block_type, per_cell)]


def test_validation_subnets_are_made_of_rows_in_windows_holding_their_width() -> None:
    rows = _rows(CIFAR_LAYOUT, 3)
    subnets = validation_subnets(CIFAR_LAYOUT, rows, 12, seed=1)
    assert subnets == validation_subnets(CIFAR_LAYOUT, rows, 12, seed=1)
    assert subnets != validation_subnets(CIFAR_LAYOUT, rows, 12, seed=2)
    assert len({choice for choice, _ in subnets}) > 1
    for choice, picked in subnets:
        for stage, (stage_choice, row) in enumerate(zip(choice.stages, picked)):
            assert int(row["stage"]) == stage and row in rows
            assert stage_choice.block_type == row["block_type"]
            start, stop = stage_choice.window
            assert int(row["width"]) in CIFAR_LAYOUT.stages[stage].widths[start:stop]
    without_stage_2 = [r for r in rows if r["stage"] != "2"]
    with pytest.raises(ValueError, match=r"stage\(s\) \[2\]"):
        validation_subnets(CIFAR_LAYOUT, without_stage_2, 1)


def test_validation_times_whole_subnets_against_stem_rows_and_head(tmp_path) -> None:
    output = tmp_path / "latency.csv"
    target = host_target("torch")
    profile_substages(TINY, output, target=target, samples_per_cell=2, warmup=0, repeats=2, progress=False)
    result = validate_substage_rows(TINY, output, target=target, subnets=4, warmup=0, repeats=2, rounds=2,
                                    min_spearman=1.01)
    assert result.record["subnets"] == 4 and not result.passed  # no Spearman reaches 1.01
    meta = json.loads((tmp_path / "latency.csv.meta.json").read_text())
    assert meta["validation"] == result.record and meta["repeats"] == 2  # the profile's meta is kept
    stem, heads = meta["fixed_ms"]["stem"], meta["fixed_ms"]["head"]
    assert stem > 0 and set(heads) <= {"16", "24"} and all(v > 0 for v in heads.values())
    latency = {substage_key(r): float(r["latency_ms"]) for r in read_latency_rows(output)}
    with open(result.csv_path, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert result.csv_path.name == "latency_validation.csv" and len(written) == 4
    for row, (choice, picked) in zip(written, validation_subnets(TINY, read_latency_rows(output), 4)):
        config = json.loads(row["config"])
        assert config["w"] == [int(r["width"]) for r in picked] and row["space"] == choice.id
        stages_ms = sum(latency[substage_key(r)] for r in picked)
        assert float(row["stages_ms"]) == pytest.approx(stages_ms, rel=1e-4)
        fixed = stem + heads[str(config["w"][-1])]
        assert float(row["predicted_ms"]) == pytest.approx(stages_ms + fixed, rel=1e-4)
        passes = [float(v) for v in row["measured_passes_ms"].split()]
        assert len(passes) == 2 and float(row["measured_ms"]) == pytest.approx(sum(passes) / 2, rel=1e-4)
        assert 0 < float(row["measured_ms"]) < 1000
    assert result.record["retest_spearman"] is None or -1 <= result.record["retest_spearman"] <= 1
    assert result.fixed_ms == meta["fixed_ms"]
    # a rerun with nothing left to measure keeps the figures of the rows it leaves as they are
    profile_substages(TINY, output, target=target, samples_per_cell=2, warmup=0, repeats=2, progress=False)
    kept = json.loads((tmp_path / "latency.csv.meta.json").read_text())
    assert kept["validation"] == result.record and kept["fixed_ms"] == meta["fixed_ms"]
