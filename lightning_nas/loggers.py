"""Logger presets (``logger: csv`` / ``logger: wandb``), always writing inside the run directory."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .files import replacing


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, made safe to kill and to resume: ``metrics.csv`` and
    ``hparams.yaml`` are rewritten atomically, and the rows of an earlier run in the directory
    are kept up to the first step this run logs (a run resumed from a checkpoint keeps the history
    before it and drops the rows of the unit it redoes; a fresh run, starting at step 0, replaces
    them all, as Lightning's writer does)."""

    def __init__(self, log_dir: str) -> None:
        self._first_save = True
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        pass  # the earlier rows are filtered by the first save instead of deleted here

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with replacing(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as temporary:
            save_hparams_to_yaml(str(temporary), self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        rows: list[dict[str, Any]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as stream:
                rows = list(csv.DictReader(stream))
            if self._first_save:
                first = min(int(m.get("step", 0)) for m in self.metrics)
                rows = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) < first]
        self._first_save = False
        self._record_new_keys()
        fields = sorted(set(self.metrics_keys).union(*rows))
        self.metrics_keys = fields
        with replacing(self.metrics_file_path) as temporary, temporary.open("w", newline="",
                                                                            encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            writer.writerows(self.metrics)
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def csv_logger(run_dir: str, name: str, settings: dict[str, Any] | None = None) -> Logger:
    return ResumableCSVLogger(save_dir=run_dir, name="logs", version="")


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
