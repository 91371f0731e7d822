"""`lightning-nas sweep`: the recipe's own verb, pipeline stage keys, W&B's engine, local offline trials."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lightning_nas.cli import main
from lightning_nas.stages.sweep import metric_from_files, suggest

# grid order of the engine: (0.01, 16), (0.1, 16), (0.01, 0), (0.1, 0); batch size 0 is a failing trial
GRID = "sweep.parameters={task.lr: {values: [0.01, 0.1]}, data.batch_size: {values: [16, 0]}}"


def local_sweep(sweep_dir: Path, trials: int) -> int:
    return main(["sweep", "recipes/classify_timm.yaml", "--smoke", "--local", str(trials), "--out", str(sweep_dir),
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "sweep.method=grid", GRID])


def test_a_local_sweep_runs_offline_resumes_and_records_a_failed_trial(tmp_path: Path) -> None:
    import matplotlib.image

    sweep_dir = tmp_path / "sweep"
    assert local_sweep(sweep_dir, 2) == 0
    first_runs = sorted(sweep_dir.glob("trial-*/wandb/offline-run-*"))
    assert len(first_runs) == 2
    assert local_sweep(sweep_dir, 3) == 0  # continues to 3 trials; the first two are not rerun

    with (sweep_dir / "trials.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["trial"] for r in rows] == ["trial-000", "trial-001", "trial-002"]
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"]
    assert [(float(r["task.lr"]), int(r["data.batch_size"])) for r in rows] == [(0.01, 16), (0.1, 16), (0.01, 0)]
    assert all(0.0 <= float(r["val/acc"]) <= 100.0 for r in rows[:2]) and rows[2]["val/acc"] == ""
    assert "data.batch_size: out of range" in rows[2]["error"]
    assert "data.batch_size: out of range" in (sweep_dir / "trial-002" / "error.txt").read_text()
    assert all(Path(r["run_dir"]) == sweep_dir / r["trial"] for r in rows)
    # each trial's metric is the last val/acc its Lightning CSV logger wrote
    for row in rows[:2]:
        logged = [r for r in csv.DictReader((Path(row["run_dir"]) / "logs" / "metrics.csv").open()) if r["val/acc"]]
        assert float(row["val/acc"]) == pytest.approx(float(logged[-1]["val/acc"]))

    best = max(rows[:2], key=lambda r: float(r["val/acc"]))
    best_recipe = yaml.safe_load((sweep_dir / "best_recipe.yaml").read_text())
    assert best_recipe["task"]["lr"] == float(best["task.lr"]) and best_recipe["run_dir"] == best["run_dir"]
    for name in ("parallel_coordinates.png", "metric_vs_parameters.png"):
        image = matplotlib.image.imread(sweep_dir / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0

    runs = sorted(sweep_dir.glob("trial-*/wandb/offline-run-*"))
    assert len(runs) == 3 and runs[:2] == first_runs
    for run in runs:  # an offline W&B run in the sweep's group, named after its trial
        record = next(run.glob("run-*.wandb")).read_bytes()
        assert b"classify_timm-sweep" in record and f"classify_timm-sweep-{run.parts[-3]}".encode() in record
    summaries = list((sweep_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(summaries) == 2 and b"parallel_coordinates" in max(summaries, key=lambda p: p.stat().st_mtime).read_bytes()

    state = json.loads((sweep_dir / "trials.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["finished", "finished", "failed"]
    # the same directory with another sweep in it is refused
    assert main(["sweep", "recipes/classify_timm.yaml", "--smoke", "--local", "3", "--out", str(sweep_dir),
                 "sweep.parameters={task.lr: {values: [0.5]}}"]) == 2


def test_the_engine_suggests_from_one_definition_by_random_grid_and_bayes() -> None:
    parameters = {"task.lr": {"min": 0.01, "max": 0.2}, "data.batch_size": {"values": [16, 32, 64]}}
    metric = {"name": "val/acc", "goal": "maximize"}
    trials = []
    for i in range(4):
        trial = suggest({"method": "random", "metric": metric, "parameters": parameters}, trials, seed=3)
        assert 0.01 <= trial["task.lr"] <= 0.2 and trial["data.batch_size"] in (16, 32, 64)
        trials.append({"name": f"t{i}", "parameters": trial, "status": "finished", "metric": trial["task.lr"] * 2})
    again = suggest({"method": "random", "metric": metric, "parameters": parameters}, trials[:2], seed=3)
    assert again == trials[2]["parameters"]  # seeded: a resumed sweep draws what it would have drawn
    bayes = suggest({"method": "bayes", "metric": metric, "parameters": parameters}, trials, seed=3)
    assert 0.01 <= bayes["task.lr"] <= 0.2 and bayes["data.batch_size"] in (16, 32, 64)
    grid = {"method": "grid", "metric": metric, "parameters": {"task.lr": {"values": [0.1, 0.2]}}}
    first = suggest(grid, [], seed=0)
    second = suggest(grid, [{"name": "a", "parameters": first, "status": "failed", "metric": None}], seed=0)
    assert {first["task.lr"], second["task.lr"]} == {0.1, 0.2}
    done = [{"name": n, "parameters": p, "status": "finished", "metric": 1.0} for n, p in (("a", first), ("b", second))]
    assert suggest(grid, done, seed=0) is None


@pytest.mark.parametrize(("recipe", "verb", "parameters"), [
    ("recipes/apq_int8.yaml", "search", "{search.mutation_prob: {values: [0.05, 0.1]}}"),
    ("recipes/latency_lut_cpu.yaml", "profile", "{profile.warmup: {values: [2, 3]}}"),
    ("recipes/quickstart.yaml", "pipeline", "{ofa_supernet/task.lr: {min: 0.05, max: 0.2}, "
                                            "4/search.population: {values: [50, 100]}}"),
])
def test_the_sweep_command_runs_the_recipes_own_verb(tmp_path: Path, recipe: str, verb: str, parameters: str) -> None:
    out, predictor = tmp_path / "sweep.yaml", tmp_path / "predictor.pt"
    predictor.write_bytes(b"")  # the search recipe's input must exist to validate it
    extra = [f"search.predictor={predictor}"] if verb == "search" else ["seed=1"]
    assert main(["sweep", recipe, "--smoke", "--out", str(out), f"sweep={{method: random, parameters: {parameters}}}",
                 *extra]) == 0
    definition = yaml.safe_load(out.read_text())
    assert definition["command"] == ["${env}", "lightning-nas", verb, recipe, "--smoke", *extra, "${args_no_hyphens}"]


def test_a_pipeline_sweep_key_names_its_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def sweep(key: str) -> int:
        return main(["sweep", "recipes/quickstart.yaml", "--out", str(tmp_path / "s.yaml"),
                     f"sweep={{method: random, parameters: {{{key}: {{values: [0.1]}}}}}}"])

    assert sweep("ofa_supernet/task.lrr") == 2
    err = capsys.readouterr().err
    assert "sweep.parameters.ofa_supernet/task.lrr" in err and "recipes/ofa_supernet.yaml" in err and "'lr'" in err
    assert sweep("ofa/task.lr") == 2
    err = capsys.readouterr().err
    assert "no stage of this pipeline has this name" in err and "ofa_supernet, pairs_fp32" in err
    assert sweep("9/task.lr") == 2
    assert main(["sweep", "recipes/classify_timm.yaml", "--out", str(tmp_path / "t.yaml"),
                 "sweep.parameters={stage/task.lr: {values: [0.1]}}"]) == 2
    assert "this recipe is not a pipeline" in capsys.readouterr().err


def test_a_local_sweep_needs_a_metric(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "recipes/classify_timm.yaml", "--local", "1", "--out", str(tmp_path), "~sweep.metric"]) == 2
    assert "sweep.metric" in capsys.readouterr().err


def test_the_metric_comes_from_the_newest_file_that_has_it(tmp_path: Path) -> None:
    import os

    logs = tmp_path / "stage_a" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,val/acc,train/loss\n0,,2.0\n0,0.5,\n1,0.75,\n1,,1.0\n")
    search = tmp_path / "stage_b" / "search"
    search.mkdir(parents=True)
    (search / "topk.json").write_text(json.dumps({"topk": [{"accuracy": 91.5}, {"accuracy": 90.0}], "val/acc": 0.25}))
    os.utime(logs / "metrics.csv", (1_000_000, 1_000_000))  # older than topk.json
    assert metric_from_files(tmp_path, "topk.0.accuracy") == pytest.approx(91.5)
    assert metric_from_files(tmp_path, "val/acc") == pytest.approx(0.25)
    assert metric_from_files(tmp_path, "stage_a/val/acc") == pytest.approx(0.75)
    assert metric_from_files(tmp_path, "nothing") is None


def test_a_local_sweep_of_a_pipeline_sets_its_stages_keys(tmp_path: Path) -> None:
    from conftest import write_recipe
    from test_pipeline import STAGE

    write_recipe(tmp_path, STAGE, "first.yaml")
    write_recipe(tmp_path, STAGE, "second.yaml")
    pipe = write_recipe(tmp_path, f"""
description: two stages
run_dir: {tmp_path / 'runs'}
pipeline:
  smoke: true
  stages: [{{recipe: first.yaml}}, {{recipe: second.yaml}}]
sweep:
  method: random
  metric: {{name: second/val/acc, goal: maximize}}
  parameters:
    second/task.lr: {{min: 0.01, max: 0.1}}
    0/data.batch_size: {{values: [16, 32]}}
""", "pipe.yaml")
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", str(pipe), "--local", "1", "--out", str(sweep_dir)]) == 0
    (row,) = csv.DictReader((sweep_dir / "trials.csv").open(newline=""))
    assert row["status"] == "finished" and 0.0 <= float(row["second/val/acc"]) <= 100.0
    first = yaml.safe_load((sweep_dir / "trial-000" / "first" / "config.yaml").read_text())
    second = yaml.safe_load((sweep_dir / "trial-000" / "second" / "config.yaml").read_text())
    assert second["task"]["lr"] == pytest.approx(float(row["second/task.lr"])) != first["task"]["lr"]
    assert first["data"]["batch_size"] == int(row["0/data.batch_size"]) and second["data"]["batch_size"] == 64  # its own
    logged = [r for r in csv.DictReader((sweep_dir / "trial-000" / "second" / "logs" / "metrics.csv").open())
              if r["val/acc"]]
    assert float(row["second/val/acc"]) == pytest.approx(float(logged[-1]["val/acc"]))
