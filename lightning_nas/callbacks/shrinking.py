"""The progressive-shrinking schedule as a Lightning callback."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from ..files import replacing
from ..tasks.phases import ShrinkingPhase, parse_phases, phase_at_epoch


class ProgressiveShrinking(pl.Callback):
    """Switch the supernet task's phase at the phase boundaries given in the recipe.

    The phases decide the length of training: the Trainer runs for the sum of their epochs.
    When a phase with ``reorder_channels`` starts for the first time, the expanded channels are
    sorted by importance (with the optimizer state), keeping the channel sets of the expand ratios
    already trained. The index of the last phase entered is saved in checkpoints, so a resumed
    run continues in the same phase without re-sorting.

    The wall time of every phase (training and validation) and the training images it read go to
    ``run_dir/phases.csv`` after each epoch (``images_per_s``: input images, whatever the number of
    subnets per step); both are kept in checkpoints, so a resumed run adds to them.
    """

    def __init__(self, phases: list[ShrinkingPhase]) -> None:
        self.phases = parse_phases(phases)
        self.entered = -1
        self.wall_seconds = [0.0] * len(self.phases)
        self.epochs_done = [0] * len(self.phases)
        self.images = [0] * len(self.phases)
        self._epoch_started: tuple[int, float] | None = None  # (phase index, clock)

    @property
    def total_epochs(self) -> int:
        return sum(phase.epochs for phase in self.phases)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs != self.total_epochs:
            rank_zero_info(f"progressive shrinking: {len(self.phases)} phases, {self.total_epochs} epochs "
                           f"(trainer.max_epochs={trainer.max_epochs} is replaced by the phases' total)")
            trainer.fit_loop.max_epochs = self.total_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        index, start = phase_at_epoch(self.phases, trainer.current_epoch)
        phase = self.phases[index]
        if index > self.entered:
            if phase.reorder_channels:
                previous = self.phases[index - 1].expand if index > 0 else None
                keep = [e for e in (previous or []) if e != max(pl_module.space.expand_choices)]
                pl_module.supernet.reorder_channels(keep_expand_ratios=keep, optimizer=pl_module.optimizers().optimizer)
            rank_zero_info(f"progressive shrinking: phase {index} '{phase.name}' from epoch {start} "
                           f"(kernel={phase.kernel}, expand={phase.expand}, depth={phase.depth}, "
                           f"{phase.subnets_per_step} subnet(s)/step, lr={phase.lr})")
            self.entered = index
        pl_module.set_phase(index, phase, start)
        self._epoch_started = (index, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._epoch_started is not None:
            self.images[self._epoch_started[0]] += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_started is None:
            return
        self.wall_seconds, self.epochs_done = self._totals()
        self._epoch_started = None
        if trainer.is_global_zero:
            self.write_table(Path(trainer.default_root_dir) / "phases.csv")

    def write_table(self, path: Path) -> None:
        """One row per phase: its epochs, the epochs run so far and their wall time."""
        start = 0
        with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["index", "name", "first_epoch", "epochs", "epochs_done", "wall_s", "images",
                             "images_per_s"])
            for index, phase in enumerate(self.phases):
                seconds = self.wall_seconds[index]
                writer.writerow([index, phase.name, start, phase.epochs, self.epochs_done[index], round(seconds, 2),
                                 self.images[index], round(self.images[index] / seconds, 1) if seconds else ""])
                start += phase.epochs

    def _totals(self) -> tuple[list[float], list[int]]:
        """Wall seconds and epochs per phase, counting the epoch under way as done."""
        seconds, done = list(self.wall_seconds), list(self.epochs_done)
        if self._epoch_started is not None:
            index, started = self._epoch_started
            seconds[index] += time.perf_counter() - started
            done[index] += 1
        return seconds, done

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written at the end of validation, before this epoch's on_train_epoch_end.
        seconds, done = self._totals()
        return {"entered": self.entered, "wall_seconds": seconds, "epochs_done": done, "images": list(self.images)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entered = state_dict["entered"]
        if len(state_dict.get("wall_seconds", [])) == len(self.phases):
            self.wall_seconds = list(state_dict["wall_seconds"])
            self.epochs_done = list(state_dict["epochs_done"])
            self.images = list(state_dict.get("images", self.images))
