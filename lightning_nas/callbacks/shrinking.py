"""The progressive-shrinking schedule as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from .phases import ShrinkingPhase, parse_phases, phase_at_epoch


class ProgressiveShrinking(pl.Callback):
    """Switch the supernet task's phase at the phase boundaries given in the recipe.

    The phases decide the length of training: the Trainer runs for the sum of their epochs.
    When a phase with ``reorder_channels`` starts for the first time, the expanded channels are
    sorted by importance (with the optimizer state), keeping the channel sets of the expand ratios
    already trained. The index of the last phase entered is saved in checkpoints, so a resumed
    run continues in the same phase without re-sorting.
    """

    def __init__(self, phases: list[ShrinkingPhase]) -> None:
        self.phases = parse_phases(phases)
        self.entered = -1

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

    def state_dict(self) -> dict[str, Any]:
        return {"entered": self.entered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entered = state_dict["entered"]
