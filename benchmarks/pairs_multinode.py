"""Accuracy-pair collection across "nodes": N processes on this machine, one per node.

Each process is a Lightning node (``trainer.num_nodes=N``, ``NODE_RANK``, gloo over 127.0.0.1)
with its own working and run directory; global rank 0 gathers the pairs and alone writes the
store. Prints the pairs per minute of the collection (rank 0's wall time from the first pair to
the last write, start-up excluded) for every N given.

    python benchmarks/pairs_multinode.py --nodes 1 2 --pairs 24
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def collect(nodes: int, pairs: int, bn_images: int, eval_images: int, threads: int, root: Path) -> dict:
    port, processes = free_port(), []
    for rank in range(nodes):
        work = root / f"n{nodes}" / f"node{rank}"
        work.mkdir(parents=True)
        command = [sys.executable, "-m", "lightning_nas.cli", "fit", str(REPO / "recipes" / "pairs_fp32.yaml"),
                   f"run_dir={work / 'run'}", "task.init_checkpoint=null", "logger=null",
                   f"callbacks.pairs.init_args.num_pairs={pairs}", f"callbacks.pairs.init_args.bn_images={bn_images}",
                   f"callbacks.pairs.init_args.eval_images={eval_images}", f"trainer.num_nodes={nodes}",
                   "trainer.devices=1", "trainer.strategy=ddp" if nodes > 1 else "trainer.strategy=auto"]
        env = {**os.environ, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
        processes.append(subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in processes]
    if any(p.returncode for p in processes):
        raise SystemExit("\n".join(e[-3000:] for e in errors))
    return json.loads((root / f"n{nodes}" / "node0" / "run" / "pairs_fp32_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--bn-images", type=int, default=200)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for nodes in args.nodes:
            summary = collect(nodes, args.pairs, args.bn_images, args.eval_images, args.threads, Path(folder))
            print(f"{nodes} process(es): {summary['collected']} pairs in {summary['collection_seconds']:.1f} s = "
                  f"{summary['pairs_per_minute']:.1f} pairs/min (median {summary['seconds_per_pair_median']:.2f} s "
                  f"per pair per process, {summary['threads']} thread(s) each)", flush=True)


if __name__ == "__main__":
    main()
