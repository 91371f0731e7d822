"""The ``lightning-nas`` command: one verb per stage, every stage a YAML recipe."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import USAGE_EXIT_CODE, RecipeError
from .recipe.packaged import find_packaged, packaged_recipes, presets_dir, recipes_dir, resolve_recipe
from .stages.verbs import STAGE_VERBS, recipe_verb

OVERRIDES_HELP = "overrides: key=value (nested.key=1, list=[1,2], flag=true), ~key to delete"


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, or the name of a packaged recipe (`lightning-nas ls`)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    parser.add_argument("--smoke", action="store_true",
                        help="apply the recipe's `smoke:` overrides: tiny data, a few steps, well under a minute")


#: Bare keys a verb accepts as shorthand for keys of its section (`rank archs=x.csv`).
SECTION_SHORTHANDS = {"rank": ("archs", "out", "ranker", "limit"), "pipeline": ("data",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-nas",
        description="Hardware-aware architecture, pruning and quantization search; every stage is a YAML recipe.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_, help_text) in STAGE_VERBS.items():
        _recipe_arguments(verbs.add_parser(verb, help=help_text, description=help_text))
    sweep = verbs.add_parser("sweep", help="a W&B sweep of the recipe's `sweep:` section: write its definition, "
                             "run it here (--local N) or on a W&B server (--start)")
    _recipe_arguments(sweep)
    sweep.add_argument("--out", help="where to write the sweep YAML (default: RUN_DIR/sweep.yaml; with --local, "
                       "the sweep's directory)")
    runs = sweep.add_mutually_exclusive_group()
    runs.add_argument("--local", type=int, metavar="N",
                      help="run N trials here with W&B's sweep engine (offline without credentials); resumable")
    runs.add_argument("--start", action="store_true", help="register the sweep with W&B and start an agent")
    sweep.add_argument("--count", type=int, help="runs for the agent started by --start")
    config = verbs.add_parser("config", help="print the resolved recipe")
    _recipe_arguments(config)
    ls = verbs.add_parser("ls", help="list the packaged recipes (or those of a directory) with their descriptions")
    ls.add_argument("directory", nargs="?", default=None,
                    help="a directory of recipes to list instead of the packaged ones")
    cp = verbs.add_parser("cp", help="copy a packaged recipe (or preset, or fragment) to edit it",
                          description="Copy a packaged recipe to edit. The fragments and stage recipes it names "
                          "are looked up beside the copy first, then in the package: copy those too to edit them.")
    cp.add_argument("name", help="a packaged recipe's name (`lightning-nas ls`), a preset, fragments/NAME, or a file")
    cp.add_argument("dest", help="the file to write, or an existing directory to write NAME.yaml into")
    return parser


def list_recipes(directory: str | None = None) -> list[tuple[str, str, str]]:
    """(name, verb, description) of every packaged recipe, or (path, verb, description) of every
    recipe in ``directory``: what to type after the verb either way."""
    import yaml

    if directory is None:
        named = packaged_recipes().items()
    else:
        folder = Path(directory)
        if not folder.is_dir():
            raise RecipeError("directory not found", given=directory, allowed="a directory of recipe YAML files")
        named = ((str(path), path) for path in sorted(folder.glob("*.yaml")))
    rows = []
    for name, path in named:
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            content = {"description": "(cannot parse this file)"}
        rows.append((name, recipe_verb(content), str(content.get("description") or "(no description)")))
    return rows


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy the recipe ``name`` (a file, a packaged recipe, preset or fragment) to ``dest``; never
    overwrites. The copy keeps its ``defaults:`` and stage names: whatever is not beside it loads
    from the package (see :mod:`lightning_nas.recipe.packaged`)."""
    source = Path(name)
    if not source.is_file():
        source = find_packaged(name, (recipes_dir(), presets_dir())) or resolve_recipe(name)
    target = Path(dest)
    if target.is_dir() or str(dest).endswith(("/", os.sep)):
        target = target / source.name
    elif not target.suffix:
        target = target.with_suffix(source.suffix)
    if target.exists():
        raise RecipeError("the destination exists; it is never overwritten", key="dest", given=str(target),
                          allowed="a new file name, or remove the file first")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(source.read_bytes())
    partial.replace(target)  # crash-safe: the destination is whole or absent
    return target


def _run(args: argparse.Namespace) -> int:
    if args.verb == "ls":
        rows = list_recipes(args.directory)
        if args.directory is None:
            print(f"# packaged recipes ({recipes_dir()}): run one by name, `lightning-nas cp NAME DEST` to edit it")
        width = max((len(name) for name, _, _ in rows), default=0)
        verb_width = max((len(verb) for _, verb, _ in rows), default=0)
        for name, verb, description in rows:
            print(f"{name:<{width}}  {verb:<{verb_width}}  {description}")
        return 0
    if args.verb == "cp":
        target = copy_recipe(args.name, args.dest)
        print(f"copied {args.name} to {target}; the fragments and stage recipes it names load from beside it "
              "first, then from the package")
        return 0

    from .stages.pipeline import load_with_stage_overrides

    # STAGE/key=value overrides a pipeline stage's key (`lightning-nas pipeline quickstart.yaml ofa_supernet/task.lr=0.2`)
    recipe = load_with_stage_overrides(args.recipe, args.overrides, smoke=args.smoke)
    if args.verb == "config":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(recipe.config)), end="")
        return 0
    if args.verb == "sweep":
        from .stages import sweep

        sweep.run(recipe, args.overrides, out=args.out, start=args.start, count=args.count, local=args.local,
                  smoke=args.smoke)
        return 0
    module, _ = STAGE_VERBS[args.verb]
    import importlib

    run_dir = importlib.import_module(module).run(recipe)
    print(f"run directory: {run_dir}")
    return 0


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Overrides may come before or after options such as ``--smoke``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") and not a.startswith("~")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    shorthands = SECTION_SHORTHANDS.get(args.verb, ())
    if shorthands:
        args.overrides = [f"{args.verb}.{o}" if o.split("=", 1)[0] in shorthands else o for o in args.overrides]
    return args


def passive_openmp_threads() -> None:
    """Let idle OpenMP threads sleep unless the user chose otherwise. The default (spinning) makes
    two jobs sharing a small CPU slow each other down several-fold; set before torch loads, since
    the OpenMP runtime reads it once."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    passive_openmp_threads()
    args = parse_arguments(argv)
    try:
        return _run(args)
    except RecipeError as error:
        if getattr(args, "recipe", None):
            error.with_source(args.recipe)  # errors raised while a stage runs name the recipe too
        print(f"error: {error.render()}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
