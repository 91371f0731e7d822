"""``lightning-nas rank``: add a ``score`` column to a CSV of NAS-Bench-201 architectures."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from ..errors import RecipeError
from ..files import replacing
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir

ARCH_COLUMN = "ArchitectureString"


def read_architectures(path: str, limit: int | None) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if ARCH_COLUMN not in (reader.fieldnames or []):
            raise RecipeError(f"the CSV has no {ARCH_COLUMN} column", key="rank.archs", given=path,
                              allowed=f"a CSV whose columns include {ARCH_COLUMN} (found: {reader.fieldnames})")
        rows = list(reader)
    rows = rows[:limit] if limit is not None else rows
    return list(reader.fieldnames), rows


def run(recipe: LoadedRecipe) -> Path:
    from ..tasks.ranking import score_architectures

    config = recipe.config
    require_sections(config, ("rank",), "rank")
    from ..recipe.sections import RankSettings

    settings = RankSettings(**config["rank"])
    run_dir = prepare_run_dir(recipe)
    columns, rows = read_architectures(settings.archs, settings.limit)
    started = time.perf_counter()
    scores = score_architectures([r[ARCH_COLUMN] for r in rows], settings.ranker, seed=settings.seed,
                                 data_path=settings.data_path, batch_size=settings.batch_size, progress=True)
    seconds = time.perf_counter() - started
    out = Path(settings.out or run_dir / "ranked.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*columns, "score"])
        writer.writeheader()
        writer.writerows({**row, "score": f"{score:.8g}"} for row, score in zip(rows, scores))
    print(f"ranked {len(rows)} architectures with {settings.ranker} in {seconds:.1f} s "
          f"({len(rows) / max(seconds, 1e-9):.1f} architectures/s) -> {out}")
    return run_dir
