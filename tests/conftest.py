from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_DIR = SHARED / "data" / "cifar10"

os.environ.setdefault("WANDB_MODE", "offline")
# Busy-waiting OpenMP threads collapse throughput when the cores are shared (CI runners, xdist).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes name paths relative to the repository root, as users run them."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A W&B run left open by one test would swallow the next test's logger."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def true_accuracy(space: Any, config: dict, policy: dict | None) -> float:
    """A known ground truth: bigger kernels, wider and deeper nets and more bits are better."""
    active = space.active_blocks(config)
    score = 50 + 0.4 * sum(config["ks"][b] for b in active) + 0.3 * sum(config["e"][b] for b in active)
    score += (config["r"] - 24) * 0.5
    if policy is not None:
        score -= sum((8 - policy["pw_w"][b]) * 0.6 + (8 - policy["dw_a"][b]) * 0.3 for b in active)
    return score


def fill_store(path: Path, count: int, kind: str, seed: int = 0) -> None:
    """``count`` synthetic pairs of ``kind`` with :func:`true_accuracy` as their top-1."""
    from lightning_nas.predictors.pair_store import Pair, PairStore, plan_key
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3CifarSpace
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    space, policies = OFAMobileNetV3CifarSpace(), QuantPolicySpace()
    rng = random.Random(seed)
    store = PairStore(path)
    for i in range(count):
        config = space.sample(rng)
        policy = policies.sample(rng, space.num_blocks) if kind == "quant" else None
        store.add(Pair(config, policy, config["r"], true_accuracy(space, config, policy), None, "synthetic",
                       seed, 0.0, kind=kind, pair_key=plan_key("synthetic", kind, seed, i)))


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(target, "w")``: a stand-in for a checkpoint that runs code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def code_payload():
    """``write(path, target)``: a checkpoint-shaped torch file whose unpickling creates ``target``."""
    import torch

    def write(path: Path, target: Path) -> Path:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {}, "epoch": 0, "global_step": 0,
                    "payload": CreatesFileWhenUnpickled(target)}, path)
        return path

    return write
