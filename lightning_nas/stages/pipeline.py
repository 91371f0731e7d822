"""``lightning-nas pipeline``: run recipes in order, chained through their run directories.

Each stage's recipe is edited by the stage's overrides (before its own smoke block, with
``pipeline.smoke``), given ``vars.runs`` = the pipeline's run directory, and run by its own verb. When it finishes, its run
directory gets ``stage_done.json`` with a hash of the resolved recipe; a later pipeline run skips
a stage whose record matches, so an interrupted pipeline resumes at the first unfinished stage
and a changed stage (and only it) is rerun. That first unfinished stage, when it is a fit of the
same recipe that left ``checkpoints/last.ckpt``, resumes from it (``ckpt_path=last``). Stages after a rerun stage are rerun too: they read
its artifacts.

``STAGE/key=value`` on the command line (STAGE: the stage recipe's file name without ``.yaml``,
or its 0-based index) overrides a key of one stage after that stage's smoke block; this is how a
sweep of a pipeline addresses its stages. ``pipeline.data`` (``data=PATH`` on the command line)
gives every image-reading stage the same data, with classes and resolutions following from it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..files import RunDirectoryLock, replacing, write_json
from ..recipe.loader import LoadedRecipe, load_recipe
from ..recipe.packaged import find_packaged
from ..recipe.sections import PipelineSettings, PipelineStage
from ..recipe.validate import validate_recipe
from .common import CONFIG_FILE, is_global_zero, prepare_run_dir
from .verbs import STAGE_VERBS, recipe_verb

DONE_FILE = "stage_done.json"
SUMMARY_FILE = "pipeline.csv"
STAGE_SEPARATOR = "/"
#: Keys of an image data section that belong to the stage (batch sizes, held-out split), not to
#: the data source: a stage keeps them when ``pipeline.data`` replaces its data.
STAGE_DATA_KEYS = ("batch_size", "eval_batch_size", "num_workers", "holdout_size", "seed", "augment",
                   "train_subset", "val_subset")
DATA_ALLOWED = ("an .npz file (x uint8 N x H x W x C, y int), an image folder with train/<class>/ and "
                "val/<class>/, a YAML file with a data section, or a data section {name: ..., ...}")


def split_stage_overrides(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the pipeline's own overrides, [(stage, override)] for every ``STAGE/key=value``)."""
    own: list[str] = []
    staged: list[tuple[str, str]] = []
    for text in overrides:
        tilde = "~" if text.startswith("~") else ""
        key, sep, value = text.removeprefix(tilde).partition("=")
        stage, slash, rest = key.partition(STAGE_SEPARATOR)
        if slash and stage and rest:  # recipe keys never hold a "/"; values (paths) may
            staged.append((stage, f"{tilde}{rest}{sep}{value}"))
        else:
            own.append(text)
    return own, staged


def stage_index(stages: Sequence[Mapping[str, Any]], name: str) -> int:
    names = [Path(str(stage["recipe"])).stem for stage in stages]
    if name.isdigit() and int(name) < len(stages):
        return int(name)
    matches = [i for i, n in enumerate(names) if n == name]
    if len(matches) == 1:
        return matches[0]
    raise RecipeError("no stage of this pipeline has this name" if not matches else
                      "several stages have this name: address the stage by its index",
                      key=f"{name}{STAGE_SEPARATOR}", given=name,
                      allowed=", ".join(names) + f" or an index 0..{len(stages) - 1}")


def add_stage_overrides(recipe: LoadedRecipe, staged: Sequence[tuple[str, str]]) -> None:
    """Route ``STAGE/key=value`` overrides into ``pipeline.stages.N.final_overrides``."""
    if not staged:
        return
    pipeline = recipe.config.get("pipeline")
    if not pipeline:
        stage, override = staged[0]
        raise RecipeError("STAGE/key=value sets a key of a pipeline's stage, and this recipe is not a pipeline",
                          source=str(recipe.path), given=f"{stage}{STAGE_SEPARATOR}{override}",
                          allowed="key=value")
    for name, override in staged:
        stage = pipeline["stages"][stage_index(pipeline["stages"], name)]
        stage["final_overrides"] = [*(stage.get("final_overrides") or []), override]


def load_with_stage_overrides(path: str | Path, overrides: Sequence[str], smoke: bool = False,
                              validate: bool = True) -> LoadedRecipe:
    """:func:`load_recipe`, where ``STAGE/key=value`` overrides go to a pipeline's stages."""
    own, staged = split_stage_overrides(overrides)
    loaded = load_recipe(path, own, smoke=smoke, validate=validate)
    add_stage_overrides(loaded, staged)
    return loaded


@dataclass
class PipelineData:
    """The data every image-reading stage gets, and what follows from it."""

    section: dict[str, Any]
    num_classes: int
    resolutions: list[int]


def data_section(given: str | Mapping[str, Any]) -> dict[str, Any]:
    """``pipeline.data`` as a data section."""
    import yaml

    if isinstance(given, Mapping):
        return dict(given)
    path = Path(given)
    if path.suffix == ".npz":
        if not path.is_file():
            raise RecipeError("file not found", key="pipeline.data", given=given, allowed=DATA_ALLOWED)
        return {"name": "npz", "train_path": str(path.resolve())}  # resolved: a resume may start elsewhere
    if path.suffix in (".yaml", ".yml") and path.is_file():
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
        section = content.get("data", content) if isinstance(content, dict) else None
        if not isinstance(section, dict) or "name" not in section:
            raise RecipeError("this YAML file holds no data section", key="pipeline.data", given=given,
                              allowed="data: {name: npz, train_path: ...} (or the section at the top level)")
        return section
    if path.is_dir():
        val = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
        if (path / "train").is_dir() and val is not None:
            return {"name": "image_folder", "train_dir": str((path / "train").resolve()), "val_dir": str(val.resolve())}
        raise RecipeError("an image folder needs train/<class>/ and val/<class>/ (or test/<class>/) subfolders",
                          key="pipeline.data", given=given, allowed=DATA_ALLOWED)
    raise RecipeError("file not found" if path.suffix in (".yaml", ".yml") else "not a data file or folder",
                      key="pipeline.data", given=given, allowed=DATA_ALLOWED)


def is_image_data(section: Any) -> bool:
    """Whether a stage's data section reads images (an image data module, not pair stores)."""
    from ..data.base import ImageClassificationDataModule
    from ..registry import DATA

    if not isinstance(section, Mapping) or section.get("name") not in DATA:
        return False
    return issubclass(DATA.entry(section["name"]).load(), ImageClassificationDataModule)


def pipeline_data(given: str | Mapping[str, Any] | None) -> PipelineData | None:
    """Read the data once: its number of classes and image size."""
    if given is None:
        return None
    from ..registry import DATA

    section = data_section(given)
    DATA.entry(str(section.get("name")), key="pipeline.data.name")
    if not is_image_data(section):
        raise RecipeError("pipeline.data is given to the stages that read images; this is not image data",
                          key="pipeline.data.name", given=section.get("name"),
                          allowed=", ".join(n for n in DATA.names() if is_image_data({"name": n})))
    resolutions = section.pop("resolutions", None)
    module = DATA.build(section)  # the data module's own checks raise RecipeError
    size = module.image_size
    return PipelineData(section, int(module.num_classes), [int(r) for r in resolutions or [size]])


def data_overrides(config: Mapping[str, Any], data: PipelineData) -> list[str]:
    """A stage's overrides that give it the pipeline's data, classes and resolutions."""
    edits = []
    if is_image_data(config.get("data")):
        kept = {k: v for k, v in config["data"].items() if k in STAGE_DATA_KEYS}
        edits.append("data=" + json.dumps({**kept, **data.section, "resolutions": data.resolutions}))
    if isinstance(config.get("space"), Mapping):
        edits += [f"space.num_classes={data.num_classes}", f"space.resolutions={json.dumps(data.resolutions)}"]
    if isinstance(config.get("task"), Mapping) and "num_classes" in config["task"]:
        edits.append(f"task.num_classes={data.num_classes}")
    return edits


def recipe_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def stage_recipe_path(pipeline_recipe: Path, given: str, index: int) -> Path:
    """The stage's recipe, relative to the pipeline recipe's folder first, then to the working
    directory, then among the packaged recipes (a pipeline copied elsewhere still finds them; the
    same lookup as a recipe's fragments)."""
    for candidate in (pipeline_recipe.parent / given, Path(given)):
        if candidate.is_file():
            return candidate
    packaged = find_packaged(given)
    if packaged is not None:
        return packaged
    raise RecipeError("recipe file not found", key=f"pipeline.stages.{index}.recipe", given=given,
                      allowed=f"a recipe path relative to {pipeline_recipe.parent} or the working directory, "
                      f"or a packaged recipe (`lightning-nas ls`)")


def load_stage(pipeline_recipe: Path, path: Path, run_dir: Path, stage: PipelineStage, smoke: bool,
               validate: bool, extra: Sequence[str] = (), deploy: Mapping[str, Any] | None = None) -> LoadedRecipe:
    """The stage's recipe with the pipeline's edits (before its own smoke block), ``vars.runs``,
    the pipeline's ``deploy`` settings (``deploy.target`` already resolved: every stage gets the same),
    the pipeline's data (``extra``) and the stage's final overrides."""
    overrides = [f"vars.runs={run_dir}"] + [f"deploy.{key}={value}" for key, value in (deploy or {}).items()]
    return load_recipe(path, [*overrides, *extra, *stage.final_overrides], smoke=smoke,
                       validate=validate, edits=stage.overrides, edits_origin=f"pipeline {pipeline_recipe}")


def pipeline_deploy(config: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline's deployment settings with ``auto`` resolved to this host's target."""
    from ..targets import resolve_target

    given = dict(config.get("deploy") or {})
    return {"target": resolve_target(given.get("target", "auto")).name,
            "allow_mixed_targets": str(bool(given.get("allow_mixed_targets", False))).lower()}


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


#: (stage recipe, stage settings, loaded stage, verb, the pipeline-data overrides of the stage)
PlannedStage = tuple[Path, PipelineStage, LoadedRecipe, str, list[str]]


def plan(recipe: LoadedRecipe) -> tuple[PipelineSettings, Path, list[PlannedStage]]:
    """Load and validate every stage first: a typo in the last stage fails before hours of training."""
    given = recipe.config["pipeline"]
    settings = PipelineSettings(**{**given, "stages": [PipelineStage(**stage) for stage in given["stages"]]})
    run_dir = Path(recipe.config["run_dir"])
    deploy = pipeline_deploy(recipe.config)
    try:
        data = pipeline_data(settings.data)
    except RecipeError as error:
        raise error.with_source(str(recipe.path), recipe.source_of("pipeline.data")) from None
    stages: list[PlannedStage] = []
    for index, stage in enumerate(settings.stages):
        path = stage_recipe_path(recipe.path, stage.recipe, index)
        loaded = load_stage(recipe.path, path, run_dir, stage, settings.smoke, validate=False, deploy=deploy)
        extra = data_overrides(loaded.config, data) if data is not None else []
        if extra:
            loaded = load_stage(recipe.path, path, run_dir, stage, settings.smoke, validate=False, extra=extra,
                                deploy=deploy)
        validate_ahead(loaded, run_dir)
        verb = recipe_verb(loaded.config)
        if verb == "pipeline":
            raise RecipeError("a pipeline cannot contain a pipeline", key=f"pipeline.stages.{index}.recipe",
                              given=str(path))
        stages.append((path, stage, loaded, verb, extra))
    return settings, run_dir, stages


def run(recipe: LoadedRecipe) -> Path:
    """Run the pipeline holding its run directory's lock: a second pipeline there refuses at once."""
    if not is_global_zero():  # a DDP rank of a stage: the launching process holds the lock
        return _run(recipe)
    with RunDirectoryLock(recipe.config["run_dir"]):
        return _run(recipe)


def _run(recipe: LoadedRecipe) -> Path:
    settings, run_dir, stages = plan(recipe)
    prepare_run_dir(recipe)
    deploy = pipeline_deploy(recipe.config)  # as plan() resolved it: the host does not change
    print(f"deployment target: {deploy['target']}", flush=True)
    rows: list[dict[str, Any]] = []
    rerun_upstream = not settings.reuse
    for index, (path, stage, loaded, verb, extra) in enumerate(stages):
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
        loaded = load_stage(recipe.path, path, run_dir, stage, settings.smoke, validate=True, extra=extra,
                            deploy=deploy)
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
