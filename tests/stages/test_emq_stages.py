"""mqbench -> emq -> allocate on the embedded digits data (no ../shared), and a kill/resume run."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_recipe

from lightning_nas.cli import main
from lightning_nas.predictors.pair_store import PairStore, file_hash, plan_key
from lightning_nas.spaces.emq_programs import HAND_MADE, LayerStatistics
from lightning_nas.stages.mqbench import PTQSettings, benchmark_key, plan_config

DATA = "data: {name: digits, batch_size: 64, eval_batch_size: 120, num_workers: 0, holdout_size: 200, " \
       "val_subset: 120, augment: false}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR ResNet-8 (6 searchable layers) after 20 steps on digits."""
    import lightning
    import torch
    import torch.nn.functional as F

    from lightning_nas.data.digits import DigitsDataModule
    from lightning_nas.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    task = ClassificationTask(model={"name": "cifar_resnet", "depth": 8}, lr=0.05)
    data = DigitsDataModule(batch_size=32, num_workers=0, augment=False)
    data.setup("fit")
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    for step, (images, labels) in enumerate(data.train_dataloader()):
        if step == 20:
            break
        loss = F.cross_entropy(task(data.normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the fields LightningModule.load_from_checkpoint reads
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def bench_recipe(tmp_path: Path, checkpoint: Path, configs: int, extra: str = "") -> Path:
    return write_recipe(tmp_path, f"""
description: test benchmark
run_dir: {tmp_path / 'bench'}
{DATA}
mqbench: {{checkpoint: {checkpoint}, num_configs: {configs}, bn_images: 32, batch_size: 32, stats_images: 16,
          hessian_samples: 1, progress: false{extra}}}
smoke: [mqbench.num_configs=2]
""", "bench.yaml")


def test_benchmark_then_evolution_then_allocation(tmp_path: Path, checkpoint: Path) -> None:
    recipe = bench_recipe(tmp_path, checkpoint, 8)
    assert main(["mqbench", str(recipe)]) == 0
    bench = tmp_path / "bench"
    digest = file_hash(checkpoint)
    pairs = PairStore(bench / "pairs.sqlite").pairs(kind="mq")
    stats = LayerStatistics.load(bench / "stats.npz")
    assert len(stats.names) == 6 and stats.meta["ptq"]["checkpoint_hash"] == digest
    ptq = PTQSettings(**stats.meta["ptq"])
    assert sorted(p.pair_key for p in pairs) == sorted(benchmark_key(ptq, 0, i) for i in range(8))
    assert all(p.pair_key.startswith(plan_key(digest, "mq", 0, 0).rsplit(":", 1)[0]) for p in pairs)
    for p in pairs:
        index = int(p.pair_key.split(":")[3])
        assert p.policy["w_bits"] == plan_config(0, index, 6, [2, 3, 4]) and p.policy["a_bits"] == 8
        assert 0.0 <= p.top1 <= 100.0
    summary = json.loads((bench / "benchmark.json").read_text())
    assert summary["configs"] == 8 and -1.0 <= summary["spearman_size"] <= 1.0
    assert (bench / "benchmark.png").is_file()
    assert len(list(csv.DictReader((bench / "benchmark.csv").open()))) == 8
    stats_mtime = (bench / "stats.npz").stat().st_mtime_ns
    assert main(["mqbench", str(recipe), "mqbench.num_configs=10"]) == 0  # resumes: 2 new ones
    assert json.loads((bench / "benchmark.json").read_text())["measured_now"] == 2
    assert (bench / "stats.npz").stat().st_mtime_ns == stats_mtime
    # other PTQ settings (here learned rounding) are another benchmark: nothing measured before is mixed in
    assert main(["mqbench", str(recipe), "mqbench.num_configs=3", "mqbench.rounding_steps=5",
                 "mqbench.rounding_images=16",
                 f"run_dir={tmp_path / 'bench16'}", f"mqbench.store={bench / 'pairs.sqlite'}"]) == 0
    assert json.loads((tmp_path / "bench16" / "benchmark.json").read_text())["configs"] == 3
    assert len(PairStore(bench / "pairs.sqlite")) == 13

    search = write_recipe(tmp_path, f"""
description: test search
run_dir: {tmp_path / 'search'}
emq: {{stats: {bench / 'stats.npz'}, store: {bench / 'pairs.sqlite'}, generations: 30, population: 4,
      screen_configs: 3, progress: false}}
smoke: [emq.generations=2]
""", "search.yaml")
    assert main(["emq", str(search)]) == 0
    out = tmp_path / "search" / "emq"
    program = json.loads((out / "best_program.json").read_text())
    assert program["train_configs"] + program["heldout_configs"] == 10
    assert -1.0 <= program["heldout_spearman"] <= 1.0
    rows = list(csv.DictReader((out / "proxies.csv").open()))
    assert [r["proxy"] for r in rows] == [*HAND_MADE, "emq"]
    assert len(list(csv.DictReader((out / "evolution.csv").open()))) == 30

    allocate = write_recipe(tmp_path, f"""
description: test allocation
run_dir: {tmp_path / 'alloc'}
{DATA}
allocate: {{stats: {bench / 'stats.npz'}, checkpoint: {checkpoint}, program: {out / 'best_program.json'},
           proxies: [emq, hawq_v3, ompq], budgets: [2.5, 3.5], random_configs: 2, batch_size: 32, progress: false}}
smoke: [allocate.random_configs=1]
""", "alloc.yaml")
    assert main(["allocate", str(allocate)]) == 0
    table = list(csv.DictReader((tmp_path / "alloc" / "allocation.csv").open()))
    methods = {(float(r["budget_bits"]), r["method"]) for r in table}
    for budget in (2.5, 3.5):
        assert {(budget, m) for m in ("emq", "hawq_v3", "ompq", "uniform", "random_best_of_2")} <= methods
    for r in table:
        assert float(r["mean_bits"]) <= float(r["budget_bits"]) + 1e-9
        if r["method"] == "uniform":
            assert r["bits"] == " ".join([str(int(float(r["budget_bits"])))] * 6)
    evaluated = len(PairStore(tmp_path / "alloc" / "allocation.sqlite"))
    assert main(["allocate", str(allocate)]) == 0  # everything is stored: nothing is measured again
    assert len(PairStore(tmp_path / "alloc" / "allocation.sqlite")) == evaluated


@pytest.mark.slow  # a subprocess measuring 25 configurations, killed and resumed: about a minute
def test_benchmark_resumes_after_sigkill_without_duplicates(tmp_path: Path, checkpoint: Path) -> None:
    recipe = bench_recipe(tmp_path, checkpoint, 25)
    store = tmp_path / "bench" / "pairs.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_nas.cli", "mqbench", str(recipe)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def count() -> int:
        if not store.is_file():
            return 0
        try:
            with sqlite3.connect(store, timeout=5) as connection:
                return connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0

    deadline = time.time() + 300
    while count() < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the benchmark finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = count()
    assert 3 <= killed_at < 25
    assert subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=600).returncode == 0
    pairs = PairStore(store).pairs(kind="mq")
    keys = [p.pair_key for p in pairs]
    assert len(keys) == len(set(keys)) == 25
    ptq = PTQSettings(**LayerStatistics.load(tmp_path / "bench" / "stats.npz").meta["ptq"])
    assert set(keys) == {benchmark_key(ptq, 0, i) for i in range(25)}
    summary = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert summary["measured_now"] == 25 - killed_at and summary["configs"] == 25


def test_recipe_mistakes_are_recipe_errors(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = bench_recipe(tmp_path, checkpoint, 4)
    assert main(["mqbench", str(recipe), "mqbench.bit_choices=[1,2]"]) == 2
    assert "mqbench.bit_choices: bit widths must be in [2, 8]" in capsys.readouterr().err
    assert main(["mqbench", str(recipe), "mqbench.layers=[conv1, nope]"]) == 2
    assert "not a conv / linear layer of the model" in capsys.readouterr().err
