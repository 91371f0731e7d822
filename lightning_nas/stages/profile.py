"""``lightning-nas profile``: measure a latency lookup table of a search space on this machine.

Writes the table (``profile.output``, default ``<run_dir>/latency_table.json``) entry by entry:
running the same recipe again after an interruption measures only what is missing. The table feeds
the ``latency_table`` cost model of later stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir

TABLE_FILE = "latency_table.json"


def run(recipe: LoadedRecipe) -> Path:
    from ..hardware.latency_profile import profile_space
    from ..hardware.latency_table import LatencyTable, LatencyTableError
    from ..recipe.profile_settings import ProfileSettings
    from ..registry import SPACES

    config = recipe.config
    require_sections(config, ("profile",), "profile")
    try:
        settings = ProfileSettings(**config["profile"])
    except TypeError as error:
        raise RecipeError(f"invalid profile settings ({error})", key="profile") from None
    from ..targets import detect_isa, resolve_target

    target = resolve_target(settings.target, key="profile.target")
    if target.isa != detect_isa():
        # the table would record this CPU's timings under another CPU kind's name
        raise RecipeError(f"a latency table times this machine's CPU ({detect_isa()}); target {target.name} "
                          "is another CPU kind: profile on a machine of that kind", key="profile.target",
                          given=settings.target, allowed=f"auto, or a {detect_isa()} target")
    if settings.int8_backend not in (None, target.runtime):
        raise RecipeError(f"int8_backend {settings.int8_backend} is not the runtime of target {target.name}",
                          key="profile.int8_backend", given=settings.int8_backend,
                          allowed=f"{target.runtime} (or leave it out)")
    run_dir = prepare_run_dir(recipe)
    space = SPACES.build(settings.space)  # validated with the recipe, resolutions included
    output = Path(settings.output) if settings.output else run_dir / TABLE_FILE
    try:
        result = profile_space(
            space, output, resolutions=settings.resolutions, batch_size=settings.batch_size, threads=settings.threads,
            precisions=settings.precisions, int8_backend=target.runtime, target=target.name, warmup=settings.warmup,
            repeats=settings.repeats, context=settings.context, realtime=settings.realtime, rounds=settings.rounds,
            limit=settings.limit, progress=settings.progress, seed=settings.seed,
        )
    except LatencyTableError as error:  # the output file exists but is not a table of these settings
        raise RecipeError(str(error), key="profile.output", given=str(output)) from None
    table = LatencyTable.load(output)
    sizes = ", ".join(f"{len(table.keys(p))} {p}" for p in table.precisions)
    state = "complete" if result.remaining == 0 else f"{result.remaining} entries still missing (run again to resume)"
    print(f"latency table {output}: {sizes} entries; measured {result.measured} now, {result.skipped} reused; {state}")
    if settings.validation_subnets and result.remaining == 0:
        validate(space, output, settings, target)
    elif settings.validation_subnets:
        print("validation on whole subnets runs once the table is complete")
    return run_dir


def validate(space: Any, output: Path, settings: Any, target: Any) -> Any:
    """The profile's self-validation (:func:`~lightning_nas.hardware.latency_validation.validate_table`),
    printed; a failed check is shouted on stderr and recorded as ``validation.passed: false``."""
    from rich.console import Console
    from rich.panel import Panel

    from ..hardware.latency_validation import validate_table

    console = Console(stderr=True)
    result = validate_table(
        space, output, subnets=settings.validation_subnets, precisions=settings.precisions,
        resolutions=settings.resolutions, target=target, warmup=settings.validation_warmup,
        repeats=settings.validation_repeats, rounds=settings.validation_rounds, realtime=settings.realtime,
        seed=settings.seed, min_spearman=settings.min_spearman,
        max_median_abs_pct_error=settings.max_median_error_pct,
    )
    for precision, figures in result.record["precisions"].items():
        spearman = "nan" if figures["spearman"] is None else f"{figures['spearman']:.3f}"
        print(f"validation {precision} on {result.record['subnets']} whole subnets: Spearman {spearman}, "
              f"median |error| {figures['median_abs_pct_error']:.1f} %, mean |error| "
              f"{figures['mean_abs_pct_error']:.1f} %, predicted/measured "
              f"{figures['median_ratio_predicted_to_measured']:.3f} ({'passed' if figures['passed'] else 'FAILED'})")
    print(f"wrote {result.csv_path} and the figures into {output} (meta.validation)")
    if not result.passed:
        failed = [p for p, f in result.record["precisions"].items() if not f["passed"]]
        limits = f"Spearman >= {settings.min_spearman}"
        if settings.max_median_error_pct is not None:
            limits += f", median |error| <= {settings.max_median_error_pct} %"
        console.print(Panel(
            f"The latency table {output} does not predict whole subnets on this machine as the recipe asks "
            f"({limits}) for {', '.join(failed)}: searches that constrain latency with it rank candidates "
            "unreliably. Profile with more rounds/repeats, realtime: true, or on a quieter machine.",
            title="[bold red]latency table FAILED validation", border_style="red"))
    return result
