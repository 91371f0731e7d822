"""`lightning-nas fit` writes a complete run directory and can resume."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from lightning_nas.cli import main

RECIPE = "recipes/classify_timm.yaml"


def test_fit_writes_config_logs_and_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}", "task.lr=0.01"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["task"]["lr"] == 0.01 and saved["run_dir"] == str(run_dir)
    assert saved["trainer"]["max_epochs"] == 1  # the smoke block was applied
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert any(row.get("val/acc") for row in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_final_epoch_skipped_by_the_validation_interval_is_validated_after_fit(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}", "trainer.max_epochs=2",
                 "trainer.check_val_every_n_epoch=3"]) == 0
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    validated = [row for row in rows if row.get("val/acc")]
    # no epoch reached the interval, so the one validation is the one after fit, at its last step
    assert len(validated) == 1
    assert int(validated[0]["step"]) == max(int(row["step"]) for row in rows)


def test_resume_from_last_checkpoint_continues_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}"]) == 0
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2"]) == 0
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["fit", RECIPE, "--smoke", f"run_dir={tmp_path / 'empty'}", "ckpt_path=last"]) == 2
    assert "no checkpoints/last.ckpt" in capsys.readouterr().err


def test_wandb_logger_writes_an_offline_run_in_the_run_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}", "logger=[csv, wandb]",
                 "trainer.limit_train_batches=1"]) == 0
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert (run_dir / "logs" / "metrics.csv").is_file()


def test_a_phase_choice_the_space_lacks_exits_2(tmp_path: Path, capsys) -> None:
    phases = "callbacks.progressive_shrinking.init_args.phases=[{name: kernel, epochs: 1, lr: 0.1, kernel: [3, 9]}]"
    assert main(["fit", "recipes/ofa_supernet.yaml", "--smoke", phases, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "callbacks.progressive_shrinking.init_args.phases[0]" in err and "[9] are not in the space" in err
