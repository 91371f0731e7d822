from __future__ import annotations

import pytest

from lightning_nas.loggers import wandb_offline


def test_wandb_goes_offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_offline({}) is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline({}) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline({}) is True
    assert wandb_offline({"offline": False}) is False


def _rows(path) -> list[dict]:  # noqa: ANN001
    import csv

    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_csv_log_of_a_resumed_run_keeps_the_rows_before_the_resume_point(tmp_path) -> None:  # noqa: ANN001
    from lightning_nas.loggers import csv_logger

    first = csv_logger(str(tmp_path), "x")
    for step in range(6):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.save()  # killed after step 5; its checkpoint was taken at step 4
    resumed = csv_logger(str(tmp_path), "x")
    resumed.log_metrics({"train/loss": 0.5, "val/acc": 10.0}, step=4)
    resumed.save()
    rows = _rows(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[-1]["val/acc"] == "10.0" and rows[0]["val/acc"] == ""
    fresh = csv_logger(str(tmp_path), "x")  # a new run from step 0 replaces the log
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.save()
    assert [r["train/loss"] for r in _rows(tmp_path / "logs" / "metrics.csv")] == ["2.0"]
    assert not list((tmp_path / "logs").glob(".*.tmp"))
