from __future__ import annotations

import os
from pathlib import Path

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
