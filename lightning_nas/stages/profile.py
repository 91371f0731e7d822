"""``lightning-nas profile``: measure a latency lookup table of a search space on this machine.

Writes the table (``profile.output``, default ``<run_dir>/latency_table.json``) entry by entry:
running the same recipe again after an interruption measures only what is missing. The table feeds
the ``latency_table`` cost model of later stages.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir

TABLE_FILE = "latency_table.json"


def run(recipe: LoadedRecipe) -> Path:
    from ..hardware.latency_table import LatencyTable, LatencyTableError, profile_space
    from ..recipe.profile_settings import ProfileSettings
    from ..registry import SPACES

    config = recipe.config
    require_sections(config, ("profile",), "profile")
    try:
        settings = ProfileSettings(**config["profile"])
    except TypeError as error:
        raise RecipeError(f"invalid profile settings ({error})", key="profile") from None
    from ..targets import resolve_target

    target = resolve_target(settings.target, key="profile.target")
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
    return run_dir
