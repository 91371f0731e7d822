"""Logger presets (``logger: csv`` / ``logger: wandb``), always writing inside the run directory."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger


def csv_logger(run_dir: str, name: str, settings: dict[str, Any] | None = None) -> Logger:
    return CSVLogger(save_dir=run_dir, name="logs", version="")


def wandb_offline(settings: dict[str, Any]) -> bool:
    """Offline unless forced online, when W&B has no credentials or is told so by WANDB_MODE."""
    if settings.get("offline") is not None:
        return bool(settings["offline"])
    if os.environ.get("WANDB_MODE") in {"offline", "disabled", "dryrun"}:
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.path.expanduser("~/.netrc")
    return not (os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8").read())


def wandb_logger(run_dir: str, name: str, settings: dict[str, Any] | None = None) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    settings = dict(settings or {})
    offline = wandb_offline(settings)
    return WandbLogger(
        save_dir=run_dir,
        project=settings.get("project", "lightning-nas"),
        entity=settings.get("entity"),
        name=settings.get("name") or f"{name}-{os.path.basename(os.path.normpath(run_dir))}",
        group=settings.get("group"),
        tags=settings.get("tags") or None,
        offline=offline,
        log_model=settings.get("log_model", False) and not offline,
    )
