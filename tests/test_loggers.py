from __future__ import annotations

import pytest

from lightning_nas.loggers import wandb_offline


def test_wandb_goes_offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_offline({}) is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline({}) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline({}) is True
    assert wandb_offline({"offline": False}) is False
