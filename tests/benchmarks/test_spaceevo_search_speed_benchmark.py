"""benchmarks/spaceevo_search_speed.py at a tiny scale: its synthetic tables cover every cell and
window, the run spends its budget, and the written best score is the Q-T score of that space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def test_tiny_run_writes_consistent_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benchmark = load_benchmark("spaceevo_search_speed")
    out = tmp_path / "figures.json"
    assert benchmark.main(["--evaluations", "40", "--population", "10", "--sample", "3", "--subnets", "500",
                           "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["spaces"] == 40 and len(figures["budgets_ms"]) == 3
    assert figures["budgets_ms"] == sorted(figures["budgets_ms"])
    assert figures["best"]["score"] == pytest.approx(figures["check_score"])
    assert 1.0 <= figures["max_latency_term"] <= (0.1 * 500) ** 0.01 + 1e-12
    printed = capsys.readouterr().out
    assert "homogeneous baselines:" in printed and "40 spaces in" in printed
