"""`lightning-nas pipeline`: stages run in order, finished stages are reused, bad stages fail first."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_recipe

from lightning_nas.cli import main
from lightning_nas.files import RunDirectoryLock
from lightning_nas.stages.pipeline import DONE_FILE, SUMMARY_FILE

# The timm baseline recipe (without its sweep section and callback presets), writing under the pipeline's run directory.
STAGE = (REPO / "recipes" / "classify_timm.yaml").read_text().split("\nsweep:")[0].replace(
    "defaults:\n  - default\n", "").replace(
    "smoke:", "vars: {runs: runs}\nrun_dir: ${vars.runs}/${name}\nsmoke:") + \
    "\n  - trainer.limit_train_batches=1\n  - trainer.limit_val_batches=1\n"


def pipeline(tmp_path: Path, second_overrides: str = "[]") -> Path:
    write_recipe(tmp_path, STAGE, "first.yaml")
    write_recipe(tmp_path, STAGE, "second.yaml")
    return write_recipe(tmp_path, f"""
description: two stages
run_dir: {tmp_path / 'runs'}
pipeline:
  smoke: true
  stages:
    - recipe: first.yaml
    - recipe: second.yaml
      overrides: {second_overrides}
""", "pipe.yaml")


def statuses(tmp_path: Path) -> list[str]:
    return [row["status"] for row in csv.DictReader((tmp_path / "runs" / SUMMARY_FILE).open())]


def test_stages_run_in_order_and_finished_ones_are_reused(tmp_path: Path) -> None:
    assert main(["pipeline", str(pipeline(tmp_path))]) == 0
    assert statuses(tmp_path) == ["ran", "ran"]
    done = json.loads((tmp_path / "runs" / "first" / DONE_FILE).read_text())
    assert done["seconds"] > 0 and len(done["config_sha256"]) == 64
    assert (tmp_path / "runs" / "second" / "logs" / "metrics.csv").is_file()

    assert main(["pipeline", str(pipeline(tmp_path))]) == 0
    assert statuses(tmp_path) == ["reused", "reused"]

    # a changed stage reruns (and so would every stage after it); the one before is kept
    assert main(["pipeline", str(pipeline(tmp_path, "[task.lr=0.02]"))]) == 0
    assert statuses(tmp_path) == ["reused", "ran"]
    assert main(["pipeline", str(pipeline(tmp_path, "[task.lr=0.02]")), "pipeline.reuse=false"]) == 0
    assert statuses(tmp_path) == ["ran", "ran"]


def test_a_bad_later_stage_fails_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pipeline", str(pipeline(tmp_path, "[task.lrr=0.02]"))]) == 2
    err = capsys.readouterr().err
    assert "second.yaml" in err and "task.lrr" in err and "unknown key" in err
    assert not (tmp_path / "runs" / "first").exists()


def test_missing_stage_recipe_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, "description: x\npipeline:\n  stages:\n    - recipe: nowhere.yaml\n", "p.yaml")
    assert main(["pipeline", str(recipe), f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.stages.0.recipe" in err and "nowhere.yaml" in err


def test_a_stage_key_on_the_command_line_overrides_that_stage_after_its_smoke_block(tmp_path: Path) -> None:
    import yaml

    assert main(["pipeline", str(pipeline(tmp_path))]) == 0
    # the stage's smoke block sets limit_train_batches=1: the command line wins over it
    assert main(["pipeline", str(pipeline(tmp_path)), "second/task.lr=0.02", "1/trainer.limit_train_batches=2"]) == 0
    assert statuses(tmp_path) == ["reused", "ran"]
    second = yaml.safe_load((tmp_path / "runs" / "second" / "config.yaml").read_text())
    assert second["task"]["lr"] == 0.02 and second["trainer"]["limit_train_batches"] == 2
    assert yaml.safe_load((tmp_path / "runs" / "first" / "config.yaml").read_text())["task"]["lr"] != 0.02
    recorded = yaml.safe_load((tmp_path / "runs" / "config.yaml").read_text())["pipeline"]["stages"][1]
    assert recorded["final_overrides"] == ["task.lr=0.02", "trainer.limit_train_batches=2"]


HOLDER = ("import sys, time; from lightning_nas.files import RunDirectoryLock; "
          "RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def test_a_second_pipeline_on_one_run_directory_refuses_at_once(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "runs"
    # a pipeline that gets past the lock fails next, on its missing stage recipe
    recipe = write_recipe(tmp_path, "description: x\npipeline:\n  stages:\n    - recipe: nowhere.yaml\n", "p.yaml")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        assert main(["pipeline", str(recipe), f"run_dir={run_dir}"]) == 2
        assert time.perf_counter() - started < 2.0
        err = capsys.readouterr().err
        assert "another pipeline is running in this run directory" in err and f"pid {holder.pid}" in err
        assert "run_dir" in err and "choose another run_dir" in err
        assert not (run_dir / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the holder cannot release its lock
        holder.wait()
    assert main(["pipeline", str(recipe), f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found" in err and "another pipeline" not in err  # the dead holder's lock was taken over
    assert RunDirectoryLock(run_dir).holder() == os.getpid()


@pytest.mark.slow
def test_two_real_pipelines_on_one_run_directory(tmp_path: Path) -> None:
    recipe = pipeline(tmp_path)
    command = [sys.executable, "-m", "lightning_nas.cli", "pipeline", str(recipe)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = RunDirectoryLock(tmp_path / "runs")
    deadline = time.monotonic() + 120
    while lock.holder() != first.pid and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"another pipeline is running in this run directory (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert statuses(tmp_path) == ["ran", "ran"]
