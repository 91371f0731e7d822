"""benchmarks/spaceevo_latency_context.py on a tiny layout: every part is timed, and the table's
prediction of each subnet is its stem, rows and head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

from lightning_nas.hardware.spaceevo_latency import profile_substages, read_latency_rows, substage_key
from lightning_nas.spaces.spaceevo_layout import HeadSpec, MacroLayout, StageSpec, StemSpec
from lightning_nas.targets import host_target

TINY = MacroLayout(name="tiny", resolution=8, num_classes=10, stem=StemSpec(channels=8),
                   stages=(StageSpec(2, (8, 16)), StageSpec(1, (16, 24))), head=HeadSpec(channels=32),
                   block_types=("mbconv", "fused_mbconv"))


def test_tiny_table_context_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "latency.csv"
    profile_substages(TINY, table, target=host_target("torch"), samples_per_cell=2, warmup=0, repeats=2,
                      progress=False)
    out = tmp_path / "context.json"
    result = load_benchmark("spaceevo_latency_context").main(
        ["--table", str(table), "--subnets", "3", "--rounds", "1", "--warmup", "0", "--repeats", "2",
         "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    latency = {substage_key(r): float(r["latency_ms"]) for r in read_latency_rows(table)}
    assert result["summary"]["subnets"] == 3 and len(result["subnets"]) == 3
    for subnet in result["subnets"]:
        assert len(subnet["stage_alone_ms"]) == len(subnet["stage_rows_ms"]) == TINY.num_stages
        assert set(subnet["stage_rows_ms"]) <= set(latency.values())
        assert subnet["rows_ms"] == pytest.approx(sum(subnet["stage_rows_ms"]) + subnet["fixed_ms"])
        assert subnet["whole_ms"] > 0 and subnet["fixed_ms"] > 0 and subnet["stages_in_pairs_ms"] != 0
    printed = capsys.readouterr().out
    assert "stem + table rows + head" in printed and "parts after their predecessor" in printed
