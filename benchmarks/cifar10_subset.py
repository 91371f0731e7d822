"""Write a small, class-balanced copy of a CIFAR-10 arrays folder (``train.npz`` / ``test.npz``).

The GPU check (benchmarks/gpu_check.sh) runs on a machine where the full arrays do not travel
(CIFAR-10's ``train.npz`` is larger than what a device run can carry): this writes a subset of
a few thousand images in the same layout, so every recipe that reads ``data.root`` runs on it::

    python benchmarks/cifar10_subset.py ../shared/data/cifar10 /tmp/cifar10_small --train 5000 --test 1000
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np


def balanced_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices with every class as evenly represented as ``count`` allows, sorted."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    share, extra = divmod(count, len(classes))
    if share + (extra > 0) > min(len(p) for p in per_class):
        raise SystemExit(f"asked for {count} images but the smallest class has {min(len(p) for p in per_class)}")
    chosen = [p[: share + (i < extra)] for i, p in enumerate(per_class)]
    return np.sort(np.concatenate(chosen))


def write_subset(source: Path, target: Path, train: int, test: int, seed: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        with np.load(source / f"{name}.npz") as arrays:
            x, y = arrays["x"], arrays["y"]
        keep = balanced_indices(y, count, seed)
        temporary = target / f".{name}.partial.npz"
        np.savez(temporary, x=x[keep], y=y[keep])
        temporary.replace(target / f"{name}.npz")
    if (source / "classes.json").is_file():
        shutil.copyfile(source / "classes.json", target / "classes.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with train.npz and test.npz")
    parser.add_argument("target", type=Path)
    parser.add_argument("--train", type=int, default=5000, help="training images (classes balanced)")
    parser.add_argument("--test", type=int, default=1000, help="test images (classes balanced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_subset(args.source, args.target, args.train, args.test, args.seed)
    print(f"wrote {args.train} training and {args.test} test images to {args.target}")


if __name__ == "__main__":
    main()
