"""``lightning-nas profile``: measure a latency lookup table of a search space on this machine.

Writes the table (``profile.output``, default ``<run_dir>/latency_table.json``) entry by entry:
running the same recipe again after an interruption measures only what is missing. The table feeds
the ``latency_table`` cost model of later stages.

With ``profile.spaceevo`` instead of ``profile.space``, sampled sub-stages of every SpaceEvo
(stage, block type) cell are timed in int8 on the target into a CSV (default
``<run_dir>/spaceevo_latency.csv``), resumably (:mod:`lightning_nas.hardware.spaceevo_latency`);
the space search (``lightning-nas search`` with a ``spaceevo:`` section) reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir

TABLE_FILE = "latency_table.json"
SPACEEVO_FILE = "spaceevo_latency.csv"
#: Keys of ``profile:`` that only the table of a space's units reads.
_UNIT_TABLE_KEYS = ("resolutions", "precisions", "context", "rounds", "correction_subnets", "apply_correction")


def run(recipe: LoadedRecipe) -> Path:
    from ..hardware.latency_correction import MIN_FIT_SUBNETS
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
    if (settings.space is None) == (settings.spaceevo is None):
        raise RecipeError("give exactly one of profile.space (a space's latency table) and profile.spaceevo "
                          "(SpaceEvo sub-stage rows)", key="profile",
                          given=sorted(k for k in ("space", "spaceevo") if config["profile"].get(k) is not None),
                          allowed=["space", "spaceevo"])
    if settings.spaceevo is not None:
        return _run_spaceevo(recipe, settings, target)
    if settings.correction_subnets and not settings.validation_subnets:
        raise RecipeError("a learned correction is judged on the validation subnets: give validation_subnets too",
                          key="profile.correction_subnets", given=settings.correction_subnets,
                          allowed="0, or validation_subnets > 0")
    if 0 < settings.correction_subnets < MIN_FIT_SUBNETS:
        raise RecipeError("too few subnets to fit a correction on", key="profile.correction_subnets",
                          given=settings.correction_subnets, allowed=f"0 or >= {MIN_FIT_SUBNETS}")
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
        validation = validate(space, output, settings, target)
        if settings.correction_subnets:
            correct(space, output, settings, validation)
    elif settings.validation_subnets:
        print("validation on whole subnets runs once the table is complete")
    return run_dir


def _run_spaceevo(recipe: LoadedRecipe, settings: Any, target: Any) -> Path:
    from ..hardware.latency_table import LatencyTableError
    from ..hardware.spaceevo_latency import profile_substages
    from ..recipe.sections import SpaceEvoProfileSettings
    from ..spaces.spaceevo_space import layout_from_hparams

    given = recipe.config["profile"]
    unused = [k for k in _UNIT_TABLE_KEYS if k in given]
    if unused:
        raise RecipeError("this key belongs to a space's latency table, not to SpaceEvo sub-stage rows",
                          key=f"profile.{unused[0]}", given=given[unused[0]], allowed="leave it out with profile.spaceevo")
    try:
        cells = SpaceEvoProfileSettings(**settings.spaceevo)
    except TypeError as error:
        raise RecipeError(f"invalid SpaceEvo profile settings ({error})", key="profile.spaceevo") from None
    try:
        layout = layout_from_hparams(cells.layout)
    except RecipeError as error:
        raise RecipeError(error.message, key="profile.spaceevo.layout", given=cells.layout,
                          allowed=error.allowed) from None
    bad_stages = [s for s in cells.stages or [] if not 0 <= s < layout.num_stages]
    if bad_stages:
        raise RecipeError("stage index out of range", key="profile.spaceevo.stages", given=bad_stages[0],
                          allowed=f"0..{layout.num_stages - 1}")
    bad_types = [b for b in cells.block_types or [] if b not in layout.block_types]
    if bad_types:
        raise RecipeError("block type not in the layout", key="profile.spaceevo.block_types", given=bad_types[0],
                          allowed=list(layout.block_types))
    run_dir = prepare_run_dir(recipe)
    output = Path(settings.output) if settings.output else run_dir / SPACEEVO_FILE
    try:
        result = profile_substages(
            layout, output, target=target, samples_per_cell=cells.samples_per_cell, stages=cells.stages,
            block_types=cells.block_types, batch_size=settings.batch_size, threads=settings.threads,
            warmup=settings.warmup, repeats=settings.repeats, realtime=settings.realtime, seed=settings.seed,
            limit=settings.limit, progress=settings.progress,
        )
    except LatencyTableError as error:
        raise RecipeError(str(error), key="profile.output", given=str(output)) from None
    state = "complete" if result.remaining == 0 else f"{result.remaining} rows still missing (run again to resume)"
    overhead = result.meta.get("overhead_ms")
    extra = "" if overhead is None else f"; ONNX Runtime call overhead {overhead:.4f} ms taken off every row"
    print(f"SpaceEvo int8 sub-stage latencies {output} (target {target.name}): measured {result.measured} now, "
          f"{result.skipped} reused; {state}{extra}")
    if settings.validation_subnets and result.remaining == 0:
        validate_spaceevo(layout, output, settings, target)
    elif settings.validation_subnets:
        print("validation on whole subnets runs once the rows are complete")
    return run_dir


def validate_spaceevo(layout: Any, output: Path, settings: Any, target: Any) -> Any:
    """The SpaceEvo rows' self-validation on whole subnets
    (:func:`~lightning_nas.hardware.spaceevo_latency.validate_substage_rows`), printed; ``None``
    when the rows do not cover every stage (a profile of some cells only)."""
    from ..hardware.spaceevo_latency import read_latency_rows, validate_substage_rows

    covered = {int(row["stage"]) for row in read_latency_rows(output)}
    if len(covered) < layout.num_stages:
        print(f"no validation on whole subnets: the rows cover stages {sorted(covered)} of "
              f"{layout.num_stages} (a subnet needs every stage)")
        return None
    result = validate_substage_rows(
        layout, output, target=target, subnets=settings.validation_subnets, warmup=settings.validation_warmup,
        repeats=settings.validation_repeats, rounds=settings.validation_rounds, realtime=settings.realtime,
        seed=settings.seed, min_spearman=settings.min_spearman,
        max_median_abs_pct_error=settings.max_median_error_pct, report=print,
    )
    r = result.record
    spearman, alone, retest = ("nan" if v is None else f"{v:.3f}"
                               for v in (r["spearman"], r["spearman_stages_only"], r["retest_spearman"]))
    fixed = result.fixed_ms
    print(f"validation int8 on {r['subnets']} whole subnets: Spearman {spearman} (rows alone "
          f"{alone}; pass against pass {retest}), median |error| {r['median_abs_pct_error']:.1f} %, mean |error| "
          f"{r['mean_abs_pct_error']:.1f} %, predicted/measured {r['median_ratio_predicted_to_measured']:.3f} "
          f"({'passed' if r['passed'] else 'FAILED'}); stem {fixed['stem']:.4f} ms, head "
          f"{min(fixed['head'].values()):.4f}-{max(fixed['head'].values()):.4f} ms")
    print(f"wrote {result.csv_path} and the figures into {output.name}.meta.json (validation, fixed_ms)")
    if not result.passed:
        _shout_failed(f"The SpaceEvo latency rows {output}", settings, ["int8"])
    return result


def _shout_failed(what: str, settings: Any, failed: list[str]) -> None:
    from rich.console import Console
    from rich.panel import Panel

    limits = f"Spearman >= {settings.min_spearman}"
    if settings.max_median_error_pct is not None:
        limits += f", median |error| <= {settings.max_median_error_pct} %"
    Console(stderr=True).print(Panel(
        f"{what} do not predict whole subnets on this machine as the recipe asks ({limits}) for "
        f"{', '.join(failed)}: searches that constrain latency with them rank candidates unreliably. "
        "Profile with more repeats, realtime: true, or on a quieter machine.",
        title="[bold red]latency table FAILED validation", border_style="red"))


def validate(space: Any, output: Path, settings: Any, target: Any) -> Any:
    """The profile's self-validation (:func:`~lightning_nas.hardware.latency_validation.validate_table`),
    printed; a failed check is shouted on stderr and recorded as ``validation.passed: false``."""
    from ..hardware.latency_validation import validate_table

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
        _shout_failed(f"The latency table {output}", settings, failed)
    return result


def correct(space: Any, output: Path, settings: Any, validation: Any) -> Any:
    """The learned correction of the table's sum
    (:func:`~lightning_nas.hardware.latency_validation.correct_table`), printed next to the plain
    sum's held-out figures; a correction that is not applied, or applied without improving, is
    shouted on stderr."""
    from rich.console import Console
    from rich.panel import Panel

    from ..hardware.latency_correction import TooFewSubnets
    from ..hardware.latency_validation import correct_table

    try:
        result = correct_table(space, output, validation.rows, subnets=settings.correction_subnets,
                               apply=settings.apply_correction, report=print)
    except TooFewSubnets as error:
        raise RecipeError(str(error), key="profile.correction_subnets", given=settings.correction_subnets,
                          allowed="0, or a space with more subnets than validation_subnets") from None
    record = result.record
    print(f"correction fitted on {record['fit_subnets']} further whole subnets, judged on the "
          f"{record['held_out_subnets']} validation subnets:")
    shouts = []
    for precision, figures in record["precisions"].items():
        raw, corrected = figures["held_out"]["raw"], figures["held_out"]["corrected"]

        def line(f: dict) -> str:
            spearman = "nan" if f["spearman"] is None else f"{f['spearman']:.3f}"
            return f"Spearman {spearman}, median |error| {f['median_abs_pct_error']:.1f} %"

        alpha = figures["model"]["alpha"]
        state = "applied" if figures["applied"] else "NOT applied"
        print(f"  {precision}: table sum {line(raw)}; corrected {line(corrected)} "
              f"(ridge alpha {'inf (a scale)' if alpha is None else f'{alpha:g}'}; {state})")
        if not figures["improved"]:
            shouts.append(f"{precision}: the correction does not improve the held-out figures; "
                          + ("applied anyway (apply_correction: always)" if figures["applied"]
                             else "recorded, not applied (cost models use the plain sum)"))
        elif not figures["applied"]:
            shouts.append(f"{precision}: the correction improves the held-out figures but is not applied "
                          "(apply_correction: never)")
    print(f"wrote {result.csv_path} and the correction into {output} (meta.correction)")
    if shouts:
        Console(stderr=True).print(Panel("\n".join(shouts), title="[bold yellow]latency correction",
                                         border_style="yellow"))
    return result
