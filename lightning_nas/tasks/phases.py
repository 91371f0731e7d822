"""Progressive-shrinking phases as plain data (torch-free: recipes are validated against it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError
from ..recipe.markers import NonNegativeFloat, PositiveFloat, PositiveInt


@dataclass(frozen=True)
class ShrinkingPhase:
    """One phase of progressive shrinking.

    ``kernel``/``expand``/``depth`` list the choices sampled in this phase; ``None`` keeps that
    dimension at the space's largest value (not elastic yet). ``reorder_channels`` sorts the
    expanded channels by importance when the phase starts (the expand phases), keeping the
    channel sets of the expand ratios of earlier phases fixed.
    """

    name: str
    epochs: PositiveInt
    lr: PositiveFloat
    kernel: list[int] | None = None
    expand: list[int] | None = None
    depth: list[int] | None = None
    subnets_per_step: PositiveInt = 1
    #: Weight of the distillation loss; None uses the task's ``kd_ratio`` (0 in a phase without elasticity).
    kd_ratio: NonNegativeFloat | None = None
    reorder_channels: bool = False
    warmup_epochs: NonNegativeFloat = 0.0

    @property
    def elastic(self) -> bool:
        return any(choice is not None for choice in (self.kernel, self.expand, self.depth))


def parse_phases(phases: Sequence[Mapping[str, Any] | ShrinkingPhase]) -> list[ShrinkingPhase]:
    parsed = [p if isinstance(p, ShrinkingPhase) else ShrinkingPhase(**p) for p in phases]
    if not parsed:
        raise RecipeError("progressive shrinking needs at least one phase", key="callbacks.progressive_shrinking.init_args.phases")
    for index, phase in enumerate(parsed):
        if phase.epochs < 1:
            raise ValueError(f"phases[{index}] ({phase.name}): epochs must be at least 1, got {phase.epochs}")
        if phase.subnets_per_step < 1:
            raise ValueError(f"phases[{index}] ({phase.name}): subnets_per_step must be at least 1")
    return parsed


def phase_at_epoch(phases: Sequence[ShrinkingPhase], epoch: int) -> tuple[int, int]:
    """(phase index, first epoch of that phase) for a 0-based epoch; past the end: the last phase."""
    start = 0
    for index, phase in enumerate(phases):
        if epoch < start + phase.epochs:
            return index, start
        start += phase.epochs
    return len(phases) - 1, start - phases[-1].epochs
