"""Progressive shrinking under DDP (gloo, two CPU processes): every rank trains the same subnets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

PHASES = ('[{name: full, epochs: 1, lr: 0.1}, '
          '{name: expand, epochs: 1, lr: 0.05, kernel: [3, 5, 7], depth: [2, 3, 4], expand: [3, 4, 6], '
          'subnets_per_step: 2, reorder_channels: true}]')


@pytest.mark.slow  # two processes importing torch and Lightning: about a minute on 2 shared cores
def test_ddp_ranks_sample_the_same_subnets(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "lightning_nas.cli", "fit", "recipes/ofa_supernet.yaml", "--smoke",
               f"run_dir={run_dir}", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
               "task.record_subnets=true", "data.resolutions=[24,28,32]", "trainer.limit_train_batches=3",
               f"callbacks.progressive_shrinking.init_args.phases={PHASES}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [[json.loads(line) for line in (run_dir / f"sampled_subnets_rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [row["step"] for row in ranks[0]] == list(range(6))
    assert ranks[0] == ranks[1]
    # the second phase really sampled elastic subnets, at more than one resolution
    elastic = [s for row in ranks[0][3:] for s in row["subnets"]]
    assert len({json.dumps(s) for s in elastic}) == len(elastic) == 6
    assert len({s["r"] for row in ranks[0] for s in row["subnets"]}) > 1
    # both ranks share rank 0's run directory, and the checkpoint holds the synchronised weights
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert (run_dir / "subnets.csv").is_file() and (run_dir / "phases.csv").is_file()


@pytest.mark.slow  # two processes importing torch and Lightning: about a minute on 2 shared cores
def test_on_two_nodes_only_global_rank_zero_writes_the_fit_outputs(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    phases = "[{name: full, epochs: 1, lr: 0.1}, {name: kernel, epochs: 1, lr: 0.05, kernel: [3, 5, 7]}]"
    nodes = []
    for rank in (0, 1):
        work = tmp_path / f"node{rank}"  # nothing shared on disk
        work.mkdir()
        command = [sys.executable, "-m", "lightning_nas.cli", "fit", str(REPO / "recipes" / "ofa_supernet.yaml"),
                   "--smoke", f"run_dir={work / 'run'}", "trainer.strategy=ddp", "trainer.num_nodes=2",
                   "trainer.devices=1", "trainer.limit_train_batches=1", "logger=csv",
                   f"callbacks.progressive_shrinking.init_args.phases={phases}"]
        env = {**os.environ, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
        env.pop("LOCAL_RANK", None)
        nodes.append(subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errors = [node.communicate(timeout=900)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-3000:] for e in errors)
    zero, one = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    state = torch.load(zero / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    for name in ("subnets.csv", "phases.csv", "config.yaml"):
        assert (zero / name).is_file() and not (one / name).exists(), name
    assert not list(one.rglob("*.ckpt")) and not list(one.rglob("metrics.csv"))
