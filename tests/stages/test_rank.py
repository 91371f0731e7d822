"""`lightning-nas rank` round-trips a CSV and adds a score column."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lightning_nas.cli import main

ARCHS = ["|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
         "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
         "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"]


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    archs = tmp_path / "archs.csv"
    with archs.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "ArchitectureString"])
        writer.writerows([[i, a] for i, a in enumerate(ARCHS)])
    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, x=rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8), y=np.arange(64) % 10)
    return archs, data


def test_rank_round_trips_a_csv(tmp_path: Path) -> None:
    archs, data = write_inputs(tmp_path)
    out = tmp_path / "ranked.csv"
    code = main(["rank", "recipes/rank_nb201.yaml", f"archs={archs}", f"out={out}", "ranker=params",
                 f"rank.data_path={data}", "rank.batch_size=8", f"run_dir={tmp_path / 'run'}"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["ArchitectureString"] for r in rows] == ARCHS and [r["id"] for r in rows] == ["0", "1", "2"]
    scores = [float(r["score"]) for r in rows]
    assert scores[0] > scores[2] > scores[1]  # all 3x3 convs > mixed > no parameters in the cells


def test_rank_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archs, data = write_inputs(tmp_path)
    assert main(["rank", "recipes/rank_nb201.yaml", f"archs={archs}", "ranker=synflw", f"rank.data_path={data}",
                 f"run_dir={tmp_path / 'run'}"]) == 2
    assert "neither a proxy" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("arch\nx\n")
    assert main(["rank", "recipes/rank_nb201.yaml", f"archs={bad}", f"rank.data_path={data}",
                 f"run_dir={tmp_path / 'run'}"]) == 2
    assert "no ArchitectureString column" in capsys.readouterr().err
