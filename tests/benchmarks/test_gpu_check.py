"""benchmarks/gpu_check.sh skips cleanly without a GPU; its CIFAR-10 subset is balanced and loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO, load_benchmark


def test_gpu_check_says_why_and_exits_zero_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing written, nothing installed


def test_subset_is_class_balanced_and_reads_as_cifar10(tmp_path: Path) -> None:
    from lightning_nas.data.cifar10 import CIFAR10DataModule

    rng = np.random.default_rng(0)
    source = tmp_path / "full"
    source.mkdir()
    for name, count in (("train", 400), ("test", 200)):
        y = rng.integers(0, 10, size=count)
        np.savez(source / f"{name}.npz", x=rng.integers(0, 255, size=(count, 32, 32, 3), dtype=np.uint8), y=y)
    subset = load_benchmark("cifar10_subset")
    subset.write_subset(source, tmp_path / "small", train=103, test=50)
    with np.load(tmp_path / "small" / "train.npz") as small, np.load(source / "train.npz") as full:
        counts = np.bincount(small["y"], minlength=10)
        assert len(small["y"]) == 103 and counts.max() - counts.min() <= 1
        # every kept image is a row of the source with its own label
        rows = {full["x"][i].tobytes(): full["y"][i] for i in range(len(full["y"]))}
        assert all(rows[x.tobytes()] == y for x, y in zip(small["x"], small["y"]))
    data = CIFAR10DataModule(root=tmp_path / "small", batch_size=16, num_workers=0, holdout_size=10)
    data.setup("fit")
    assert len(data.train_set) == 93 and len(data.val_set) == 50
