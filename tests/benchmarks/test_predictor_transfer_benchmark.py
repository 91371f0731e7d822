"""benchmarks/predictor_transfer.py on a synthetic store: both curves, the table, the plot."""

from __future__ import annotations

from pathlib import Path

from conftest import fill_store, load_benchmark


def test_transfer_and_scratch_curves_are_written(tmp_path: Path) -> None:
    fill_store(tmp_path / "pairs.sqlite", 300, "fp32")
    fill_store(tmp_path / "pairs.sqlite", 90, "quant", seed=1)
    report = load_benchmark("predictor_transfer").main(["--store", str(tmp_path / "pairs.sqlite"), "--sizes", "20,40", "--seeds", "2",
                                    "--test-pairs", "50", "--epochs", "40", "--hidden", "32", "--layers", "2",
                                    "--lr", "3e-3", "--out", str(tmp_path / "out")])
    summary = report["summary"]
    assert set(summary) == {"20", "40"} and all(set(v) == {"transfer", "scratch"} for v in summary.values())
    assert all(r["test_pairs"] == 50 for r in report["runs"])
    assert {r["train_pairs"] for r in report["runs"]} == {20, 40}
    # the fp32 predictor already knows the architecture part of the ranking
    assert summary["20"]["transfer"]["kendall_mean"] > summary["20"]["scratch"]["kendall_mean"]
    assert (tmp_path / "out" / "sample_efficiency.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.json").is_file()
