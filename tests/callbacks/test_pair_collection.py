"""Pair collection: SIGKILL in the middle, then resume; two nodes, one store: every planned pair exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from lightning_nas.predictors.pair_store import PairStore

RECIPE = "recipes/pairs_fp32.yaml"


def collect_command(run_dir: Path, num_pairs: int) -> list[str]:
    return [sys.executable, "-m", "lightning_nas.cli", "fit", RECIPE, "--smoke", f"run_dir={run_dir}",
            "task.init_checkpoint=null", f"callbacks.pairs.init_args.num_pairs={num_pairs}",
            "callbacks.pairs.init_args.bn_images=32", "callbacks.pairs.init_args.eval_images=64",
            "logger=null"]


def test_killed_collection_resumes_without_duplicates(tmp_path: Path) -> None:
    run_dir, planned = tmp_path / "pairs", 16
    store_path = run_dir / "pairs.sqlite"
    process = subprocess.Popen(collect_command(run_dir, planned), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if store_path.is_file() and len(PairStore(store_path)) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = len(PairStore(store_path))
    assert 3 <= partial < planned
    finished = subprocess.run(collect_command(run_dir, planned), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    pairs = PairStore(store_path).pairs()
    keys = [p.pair_key for p in pairs]
    assert len(keys) == planned == len(set(keys))
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))
    assert all(0 <= p.top1 <= 100 and p.resolution in (24, 28, 32) for p in pairs)
    import json

    summary = json.loads((run_dir / "pairs_fp32_summary.json").read_text())
    assert summary["pairs"] == planned and summary["seconds_per_pair_mean"] > 0
    assert summary["top1_min"] <= summary["top1_mean"] <= summary["top1_max"]


class CountingData:
    """A data module stand-in whose training loader has 3 batches and counts how often it is built."""

    def __init__(self) -> None:
        self.loaders = 0

    def train_dataloader(self):  # noqa: ANN201
        import torch

        self.loaders += 1
        return [(torch.full((2, 3, 4, 4), float(10 * self.loaders + i)), torch.zeros(2, dtype=torch.long))
                for i in range(3)]


def test_quantized_collector_draws_its_finetuning_batches_once() -> None:
    from lightning_nas.callbacks.pairs import QuantizedPairCollector

    collector, data = QuantizedPairCollector(finetune_steps=5), CountingData()
    first = collector.finetune_batches(data)
    assert len(first) == 5 and data.loaders == 2  # the loader ran out once and was restarted
    assert [float(x[0, 0, 0, 0]) for x, _ in first] == [10, 11, 12, 20, 21]
    assert collector.finetune_batches(data) is first and data.loaders == 2  # the next pairs reuse them


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two processes importing torch and Lightning, then 12 pairs: about a minute on 2 shared cores
def test_two_nodes_gather_their_pairs_into_node_zeros_store(tmp_path: Path) -> None:
    port, planned = free_port(), 12
    nodes = []
    for rank in (0, 1):
        work = tmp_path / f"node{rank}"  # nothing shared on disk: own working and run directory
        work.mkdir()
        command = [*collect_command(work / "run", planned), "trainer.num_nodes=2", "trainer.devices=1",
                   "trainer.strategy=ddp", "callbacks.pairs.init_args.write_every=2"]
        command[4] = str(REPO / RECIPE)
        env = {**os.environ, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("LOCAL_RANK", None)
        nodes.append(subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-3000:] for e in errors)

    pairs = PairStore(tmp_path / "node0" / "run" / "pairs.sqlite").pairs()
    keys = [p.pair_key for p in pairs]
    assert len(keys) == len(set(keys)) == planned
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))
    node1 = tmp_path / "node1"
    assert not list(node1.rglob("*.sqlite*")) and not list(node1.rglob("pairs_*_summary.json"))
    assert not list(node1.rglob("config.yaml"))
    import json

    summary = json.loads((tmp_path / "node0" / "run" / "pairs_fp32_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["collected"] == planned and summary["pairs_per_minute"] > 0


@pytest.mark.slow
def test_two_collectors_on_one_store_store_every_pair_once(tmp_path: Path) -> None:
    store_path, planned = tmp_path / "shared.sqlite", 16
    commands = [collect_command(tmp_path / name, planned) + [f"callbacks.pairs.init_args.store={store_path}"]
                for name in ("first", "second")]
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    errors = [p.communicate(timeout=600)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-2000:] for e in errors]
    keys = [p.pair_key for p in PairStore(store_path).pairs()]
    assert len(keys) == planned == len(set(keys))
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))
