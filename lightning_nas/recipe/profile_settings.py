"""Recipe settings of `lightning-nas profile` (read by recipe validation: no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..targets import TargetName
from .markers import NonNegativeInt, PositiveFloat, PositiveInt, SpaceSpec

if TYPE_CHECKING:
    from .sections import SpaceEvoProfileSettings

__all__ = ["ProfileSettings"]


@dataclass
class ProfileSettings:
    """``lightning-nas profile``: measure a latency lookup table of a space on this machine.

    Every distinct unit (stem, blocks, head parts) the space can produce at ``resolutions`` is
    timed (warm-up, then the median of ``repeats``) and written to ``output`` entry by entry, so an
    interrupted run resumes when run again with the same ``output``.
    """

    #: The search space whose units are measured (``{name: ofa_mbv3_cifar, ...}``); exactly one of
    #: ``space`` and ``spaceevo`` is given.
    space: SpaceSpec | None = None
    #: Time sampled int8 sub-stages of the SpaceEvo cells instead (rows of a CSV, see
    #: :class:`~lightning_nas.recipe.sections.SpaceEvoProfileSettings`).
    spaceevo: SpaceEvoProfileSettings | None = None
    #: The table file; default ``<run_dir>/latency_table.json``.
    output: str | None = None
    #: Input resolutions to cover; default: every resolution of the space.
    resolutions: list[int] | None = None
    batch_size: PositiveInt = 1
    #: Intra-op threads of the measurement (recorded in the table).
    threads: PositiveInt = 1
    precisions: list[Literal["fp32", "int8"]] = field(default_factory=lambda: ["fp32", "int8"])
    #: The deployment target the table is for (recorded in it; ``auto``: this host, torch runtime).
    target: TargetName = "auto"
    #: int8 kernels: torch.ao (x86 engine) or onnxruntime on the ONNX QDQ export; default: the
    #: target's runtime.
    int8_backend: Literal["torch", "onnxruntime"] | None = None
    #: Time units inside profiling networks (realistic caches) or each alone (the OFA way).
    context: Literal["network", "isolated"] = "network"
    #: Time under real-time priority (needs root) so that other processes cannot preempt it.
    realtime: bool = False
    warmup: NonNegativeInt = 10
    repeats: PositiveInt = 50
    #: Passes over all profiling networks (network context), pooled: entries then average over the
    #: machine's drift during the run instead of catching one moment; keeps the networks in memory.
    rounds: PositiveInt = 1
    #: Stop after this many profiling networks (network context) or entries (isolated); for smoke runs.
    limit: PositiveInt | None = None
    #: Show a progress bar.
    progress: bool = True
    seed: int = 0
    #: Self-validation once the table is complete: this many random whole subnets are measured and
    #: compared with the table's sum (Spearman, median abs. error; written into the table and a
    #: ``<table>_validation.csv``). 0 skips it. About 30 gives a Spearman stable to a few hundredths.
    #: With ``spaceevo`` the subnets are made of the table's rows (stem + rows + head against whole
    #: int8 networks, :func:`~lightning_nas.hardware.spaceevo_latency.validate_substage_rows`).
    validation_subnets: NonNegativeInt = 30
    validation_warmup: NonNegativeInt = 5
    validation_repeats: PositiveInt = 30
    #: Passes over all validation subnets (a subnet's figure is the median over passes).
    validation_rounds: PositiveInt = 3
    #: A precision whose validation Spearman is below this fails (``validation.passed: false``, and
    #: a warning); a table that fails still is written.
    min_spearman: float = 0.9
    #: Also fail a precision whose median absolute error exceeds this many percent (None: no check).
    max_median_error_pct: PositiveFloat | None = None
    #: A learned correction of the table's sum: this many further random whole subnets (distinct from
    #: the validation subnets, measured as they are) fit a small ridge regression on log latency,
    #: judged on the validation subnets only (figures in the table's ``meta.correction`` and a
    #: ``<table>_correction.csv``). 0: none. Needs ``validation_subnets``; at least 3.
    correction_subnets: NonNegativeInt = 0
    #: When cost models apply the fitted correction: ``if_better`` (its held-out Spearman is not
    #: lower and its median error not higher than the plain sum's, one of them better), ``always``,
    #: or ``never`` (recorded only).
    apply_correction: Literal["if_better", "always", "never"] = "if_better"
