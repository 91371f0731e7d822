"""``lightning-nas pipeline``: run recipes in order, chained through their run directories.

Each stage's recipe is edited by the stage's overrides (before its own smoke block, with
``pipeline.smoke``), given ``vars.runs`` = the pipeline's run directory, and run by its own verb. When it finishes, its run
directory gets ``stage_done.json`` with a hash of the resolved recipe; a later pipeline run skips
a stage whose record matches, so an interrupted pipeline resumes at the first unfinished stage
and a changed stage (and only it) is rerun. That first unfinished stage, when it is a fit of the
same recipe that left ``checkpoints/last.ckpt``, resumes from it (``ckpt_path=last``). Stages after a rerun stage are rerun too: they read
its artifacts.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..files import RunDirectoryLock, replacing, write_json
from ..recipe.errors import RecipeError
from ..recipe.loader import LoadedRecipe, load_recipe
from ..recipe.sections import PipelineSettings, PipelineStage
from ..recipe.validate import validate_recipe
from .common import CONFIG_FILE, is_global_zero, prepare_run_dir

DONE_FILE = "stage_done.json"
SUMMARY_FILE = "pipeline.csv"


def recipe_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def stage_recipe_path(pipeline_recipe: Path, given: str, index: int) -> Path:
    """The stage's recipe, relative to the pipeline recipe's folder first, then to the working directory."""
    for candidate in (pipeline_recipe.parent / given, Path(given)):
        if candidate.is_file():
            return candidate
    raise RecipeError("recipe file not found", key=f"pipeline.stages.{index}.recipe", given=given,
                      allowed=f"a recipe path relative to {pipeline_recipe.parent} or the working directory")


def load_stage(pipeline_recipe: Path, path: Path, run_dir: Path, stage: PipelineStage, smoke: bool,
               validate: bool) -> LoadedRecipe:
    """The stage's recipe with the pipeline's edits (before its own smoke block) and ``vars.runs``."""
    return load_recipe(path, [f"vars.runs={run_dir}"], smoke=smoke, validate=validate, edits=stage.overrides,
                       edits_origin=f"pipeline {pipeline_recipe}")


def is_finished(run_dir: Path, digest: str) -> bool:
    done = run_dir / DONE_FILE
    if not done.is_file():
        return False
    try:
        return json.loads(done.read_text(encoding="utf-8")).get("config_sha256") == digest
    except json.JSONDecodeError:
        return False


def interrupted_fit(stage_dir: Path, config: Mapping[str, Any]) -> bool:
    """Whether ``stage_dir`` holds an unfinished fit of this very recipe (its ``config.yaml``) with
    a ``checkpoints/last.ckpt`` to resume from: a killed stage then loses at most its last epoch."""
    if config.get("ckpt_path") is not None or not (stage_dir / "checkpoints" / "last.ckpt").is_file():
        return False
    try:
        earlier = yaml.safe_load((stage_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False

    def without_resume(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k != "ckpt_path"}

    return isinstance(earlier, dict) and recipe_hash(without_resume(earlier)) == recipe_hash(without_resume(config))


def validate_ahead(loaded: LoadedRecipe, run_dir: Path) -> None:
    """Validate a stage before anything runs; files inside the pipeline's run directory may be
    missing (an earlier stage writes them), so such an error is left for the stage's own turn."""
    try:
        validate_recipe(loaded.config)
    except RecipeError as error:
        inside = isinstance(error.given, str) and Path(error.given).resolve().is_relative_to(run_dir.resolve())
        if error.message == "file not found" and inside:
            return
        raise error.with_source(str(loaded.path), loaded.source_of(error.key)) from None


def run(recipe: LoadedRecipe) -> Path:
    """Run the pipeline holding its run directory's lock: a second pipeline there refuses at once."""
    if not is_global_zero():  # a DDP rank of a stage: the launching process holds the lock
        return _run(recipe)
    with RunDirectoryLock(recipe.config["run_dir"]):
        return _run(recipe)


def _run(recipe: LoadedRecipe) -> Path:
    from ..cli import STAGE_VERBS, recipe_verb

    given = recipe.config["pipeline"]
    settings = PipelineSettings(**{**given, "stages": [PipelineStage(**stage) for stage in given["stages"]]})
    run_dir = prepare_run_dir(recipe)
    stages: list[tuple[Path, PipelineStage, LoadedRecipe, str]] = []
    # Load and validate every stage first: a typo in the last stage fails before hours of training.
    for index, stage in enumerate(settings.stages):
        path = stage_recipe_path(recipe.path, stage.recipe, index)
        loaded = load_stage(recipe.path, path, run_dir, stage, settings.smoke, validate=False)
        validate_ahead(loaded, run_dir)
        verb = recipe_verb(loaded.config)
        if verb == "pipeline":
            raise RecipeError("a pipeline cannot contain a pipeline", key=f"pipeline.stages.{index}.recipe",
                              given=str(path))
        stages.append((path, stage, loaded, verb))

    rows: list[dict[str, Any]] = []
    rerun_upstream = not settings.reuse
    for index, (path, stage, loaded, verb) in enumerate(stages):
        stage_dir = Path(loaded.config["run_dir"])
        # `now` timestamps make no two loads of such a recipe equal: it is always rerun.
        digest = recipe_hash(loaded.config)
        name = f"[{index + 1}/{len(stages)}] {verb} {path}"
        if not rerun_upstream and is_finished(stage_dir, digest):
            print(f"{name}: finished before in {stage_dir}, reused", flush=True)
            rows.append({"stage": index + 1, "verb": verb, "recipe": str(path), "run_dir": str(stage_dir),
                         "status": "reused", "seconds": 0.0})
            continue
        rerun_upstream = True
        print(f"{name} -> {stage_dir}", flush=True)
        started = time.perf_counter()
        # Loaded again now that earlier stages wrote their files: this time fully validated.
        loaded = load_stage(recipe.path, path, run_dir, stage, settings.smoke, validate=True)
        digest = recipe_hash(loaded.config)
        # Only the first stage run now may resume: a later one's inputs were just rewritten.
        if verb == "fit" and settings.reuse and all(r["status"] == "reused" for r in rows) \
                and interrupted_fit(stage_dir, loaded.config):
            print(f"{name}: resuming the interrupted run from {stage_dir / 'checkpoints' / 'last.ckpt'}", flush=True)
            loaded.config["ckpt_path"] = "last"
        module = importlib.import_module(STAGE_VERBS[verb][0])
        stage_dir = Path(module.run(loaded))
        seconds = time.perf_counter() - started
        write_json(stage_dir / DONE_FILE, {"recipe": str(path), "config_sha256": digest, "seconds": round(seconds, 2),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{name}: done in {seconds:.1f} s", flush=True)
        rows.append({"stage": index + 1, "verb": verb, "recipe": str(path), "run_dir": str(stage_dir),
                     "status": "ran", "seconds": round(seconds, 2)})

    with replacing(run_dir / SUMMARY_FILE) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(r["recipe"]) for r in rows)
    for r in rows:
        print(f"  {r['stage']:>2}  {r['verb']:<7} {r['recipe']:<{width}}  {r['status']:<6} {r['seconds']:>8.1f} s")
    print(f"  total {sum(r['seconds'] for r in rows):.1f} s")
    return run_dir
