"""Load a recipe: compose its fragments, apply overrides, resolve interpolations, validate.

A recipe is a file path or the name of a packaged recipe (an existing file wins; see
:mod:`lightning_nas.recipe.packaged`).
Composition: a recipe's ``defaults:`` lists fragment files, found relative to the including file,
in the project's top-level ``callbacks/`` presets, then among the packaged presets and recipes
(``.yaml`` may be omitted), so a recipe copied anywhere still finds the fragments it does not have. Fragments merge in
order, then the recipe itself on top; mappings merge key by key, lists are replaced, and a mapping
with ``_replace_: true`` replaces the fragments' mapping at its place instead of merging into it.
Overrides: ``key=value`` (value parsed as YAML: lists, booleans, numbers, null), ``~key`` deletes.
``--smoke`` applies the recipe's own ``smoke:`` overrides before those from the command line.
Interpolations are resolved once, at load time, so ``${now:...}`` gives one run directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..errors import RecipeError
from .packaged import find_packaged, presets_dir, recipes_dir, resolve_recipe
from .signature import signature_of
from .validate import RECIPE_SCHEMA, validate_recipe

PRESETS_DIR = "callbacks"
#: Set by the launching process so that every DDP rank writes into the same run directory.
RUN_DIR_ENV = "LIGHTNING_NAS_RUN_DIR"
COMMAND_LINE = "the command line"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("now", lambda fmt="%Y%m%d-%H%M%S": datetime.now().strftime(fmt))


@dataclass
class LoadedRecipe:
    """A validated, fully resolved recipe and where each of its keys came from."""

    path: Path
    config: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, key: str | None) -> str:
        """The file (or 'the command line') that set ``key``, its contents, or its closest parent."""
        if key and key not in self.sources:
            inside = [origin for k, origin in self.sources.items() if k.startswith(key + ".")]
            if inside:
                return inside[-1]
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return str(self.path)


def _flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, Mapping) and node:
        for name, child in node.items():
            yield from _flat_keys(child, f"{prefix}.{name}" if prefix else str(name))
    elif prefix:
        yield prefix


def _read_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError, OmegaConf errors: their text gives the position
        raise RecipeError(f"cannot parse YAML: {error}", source=str(path)) from None
    if loaded is None:
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise RecipeError("a recipe must be a mapping of keys to values", source=str(path), given=type(loaded).__name__)
    return loaded


def project_root(recipe: Path) -> Path | None:
    """The nearest ancestor directory holding the ``callbacks/`` presets (YAML files: the package's
    own ``lightning_nas/callbacks/`` Python code, above an installed recipe, is no preset folder)."""
    for directory in (recipe.parent, *recipe.parent.parents):
        if any((directory / PRESETS_DIR).glob("*.yaml")):
            return directory
    return None


def _find_fragment(entry: str, including: Path, root: Path | None) -> Path:
    names = [entry] if entry.endswith((".yaml", ".yml")) else [entry + ".yaml", entry]
    candidates = [including.parent / n for n in names]
    if root is not None:
        candidates += [root / PRESETS_DIR / n for n in names] + [root / n for n in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    packaged = find_packaged(entry, (presets_dir(), recipes_dir()))
    if packaged is not None:
        return packaged
    folders = [root / PRESETS_DIR] if root else []
    presets = sorted({p.stem for folder in (*folders, presets_dir()) for p in folder.glob("*.yaml")})
    raise RecipeError(
        "fragment not found",
        source=str(including),
        key="defaults",
        given=entry,
        allowed=f"a path relative to {including.parent}, a packaged recipe fragment (fragments/...) or a "
                "preset: " + ", ".join(presets),
    )


def _compose(path: Path, root: Path | None, chain: tuple[Path, ...], sources: dict[str, str]) -> DictConfig:
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise RecipeError(f"fragments include each other in a cycle: {cycle}", source=str(path), key="defaults")
    node = _read_yaml(path)
    defaults = OmegaConf.to_container(node, resolve=False).get("defaults", [])  # names, never interpolated
    if "defaults" in node:
        del node["defaults"]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise RecipeError("expected a list of fragment paths", source=str(path), key="defaults", given=defaults)
    merged = OmegaConf.create({})
    for entry in defaults:
        fragment = _find_fragment(entry, path, root)
        merged = OmegaConf.merge(merged, _compose(fragment, root, (*chain, path.resolve()), sources))
    for *parents, leaf in _replaced_keys(node):
        container: Any = merged
        for part in parents:
            container = container.get(part) if isinstance(container, DictConfig) else None
        if isinstance(container, DictConfig) and leaf in container:
            del container[leaf]
    for key in _flat_keys(OmegaConf.to_container(node, resolve=False)):
        sources[key] = str(path)
    return OmegaConf.merge(merged, node)


def _replaced_keys(node: DictConfig) -> list[tuple[Any, ...]]:
    """Key paths of the mappings marked ``_replace_: true``; the markers are removed."""
    found: list[tuple[Any, ...]] = []

    def walk(mapping: dict, prefix: tuple[Any, ...]) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                if value.get("_replace_") is True:
                    found.append((*prefix, key))
                walk(value, (*prefix, key))

    walk(OmegaConf.to_container(node, resolve=False), ())  # type: ignore[arg-type]
    for path in found:
        container: Any = node
        for part in path:  # every step is a mapping (found above), so nothing is resolved
            container = container[part]
        del container["_replace_"]
    return found


def parse_override(text: str) -> tuple[str, Any, bool]:
    """``key=value`` -> (key, value, False); ``~key`` -> (key, None, True)."""
    if text.startswith("~"):
        key = text[1:].split("=", 1)[0]
        if not key:
            raise RecipeError("'~' must be followed by the key to delete", key=None, given=text)
        _check_key(key, text)
        return key, None, True
    key, sep, raw = text.partition("=")
    key = key.lstrip("+")
    if not sep or not key:
        raise RecipeError("an override must look like key=value or ~key", given=text,
                          allowed="e.g. trainer.max_epochs=3, data.resolutions=[24,32], ~callbacks.early_stopping")
    _check_key(key, text)
    try:
        # Unresolved: an interpolation such as ${run_dir} is resolved with the whole recipe later.
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]), resolve=False)["value"]
    except (OmegaConfBaseException, YAMLError) as error:
        raise RecipeError(f"cannot parse the value: {error}", key=key, given=raw) from None
    return key, value, False


_KEY = re.compile(r"[\w-]+(\.[\w-]+)*")


def _check_key(key: str, text: str) -> None:
    if not _KEY.fullmatch(key):
        raise RecipeError("not a key path", given=text,
                          allowed="dot-separated names of letters, digits, '_' and '-' (trainer.max_epochs, "
                                  "pipeline.stages.0.recipe)")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], origin: str, sources: dict[str, str]) -> None:
    for text in overrides:
        key, value, delete = parse_override(text)
        if delete:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise RecipeError("cannot delete a key the recipe does not have", key=key)
            del parent[leaf]
            continue
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as error:
            raise RecipeError(f"cannot set it: {error}", key=key, given=value).with_source(origin) from None
        for leaf in _flat_keys(value, key) if isinstance(value, Mapping) else [key]:
            sources[leaf] = origin
        sources[key] = origin


def _resolve(cfg: DictConfig, path: Path) -> dict[str, Any]:
    _register_resolvers()
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise _recipe_error(error, path) from None
    assert isinstance(resolved, dict)
    return resolved


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = (), smoke: bool = False,
                validate: bool = True, edits: Sequence[str] = (), edits_origin: str = "a pipeline") -> LoadedRecipe:
    """Read, compose, override, resolve and validate a recipe file.

    ``edits`` are overrides that change the recipe itself (a pipeline's per-stage overrides): they
    apply before the smoke block, so ``--smoke`` still shrinks the edited recipe.
    """
    recipe_path = resolve_recipe(path)
    sources: dict[str, str] = {}
    loaded = LoadedRecipe(recipe_path, {}, sources)
    try:
        cfg = _compose(recipe_path, project_root(recipe_path.resolve()), (), sources)
        # The written value, unresolved: resolving here would fail on an interpolation that only the
        # finished recipe can resolve (and report it without a key).
        if OmegaConf.to_container(cfg, resolve=False).get("name") is None:
            cfg["name"] = recipe_path.stem
        for key, param in signature_of(RECIPE_SCHEMA).parameters.items():
            if key not in cfg and not param.required and param.default is not ...:
                cfg[key] = param.default  # the schema's defaults, so config.yaml shows what ran
        apply_overrides(cfg, edits, edits_origin, sources)
        if smoke:
            # Unresolved: its ${...} are resolved with the final recipe, after the command line.
            block = OmegaConf.to_container(cfg, resolve=False).get("smoke")
            if not block:
                raise RecipeError("--smoke needs a `smoke:` list of overrides in the recipe", key="smoke")
            if not isinstance(block, list) or not all(isinstance(o, str) for o in block):
                raise RecipeError("expected a list of overrides such as 'trainer.max_epochs=1'", key="smoke",
                                  given=block)
            apply_overrides(cfg, block, f"smoke block of {recipe_path}", sources)
        apply_overrides(cfg, overrides, COMMAND_LINE, sources)
        inherited_run_dir = os.environ.get(RUN_DIR_ENV)
        if inherited_run_dir and os.environ.get("LOCAL_RANK", "0") != "0":
            cfg["run_dir"] = inherited_run_dir  # a DDP child: rank 0 already chose the directory
        loaded.config = _resolve(cfg, recipe_path)
        if validate:
            validate_recipe(loaded.config)
    except RecipeError as error:
        raise error.with_source(str(recipe_path), loaded.source_of(error.key)) from None
    except OmegaConfBaseException as error:  # an interpolation resolved early, e.g. by a key lookup
        raise _recipe_error(error, recipe_path).with_source(str(recipe_path)) from None
    return loaded


def _recipe_error(error: OmegaConfBaseException, path: Path) -> RecipeError:
    key = getattr(error, "full_key", None) or None
    message = (getattr(error, "msg", None) or str(error) or type(error).__name__).splitlines()[0]
    return RecipeError(f"cannot resolve: {message}", source=str(path), key=key)
