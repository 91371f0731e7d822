"""The recipes and callback presets that ship with the package, and recipe names.

Installed, they are the data packages ``lightning_nas/recipes`` and ``lightning_nas/presets``
(mapped from the repository's top-level ``recipes/`` and ``callbacks/`` by pyproject.toml). Run
from a checkout (an editable install, or ``PYTHONPATH``), those top-level folders themselves.

Every lookup of a file a recipe names (a ``defaults:`` fragment, a pipeline's stage recipe) tries
the places near the recipe first and these packaged folders last, so a recipe copied out of the
package with ``lightning-nas cp`` still loads: what is not beside the copy comes from the package.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import RecipeError

_PACKAGE = Path(__file__).resolve().parents[1]
RECIPE_SUFFIXES = (".yaml", ".yml")


def _data_dir(packaged: str, checkout: str) -> Path:
    inside = _PACKAGE / packaged
    if inside.is_dir():  # an installed wheel
        return inside
    return _PACKAGE.parent / checkout  # a checkout: the repository's own folder


def recipes_dir() -> Path:
    """The packaged recipes (``fragments/`` inside)."""
    return _data_dir("recipes", "recipes")


def presets_dir() -> Path:
    """The packaged callback presets (``default``, ``progressive_shrinking``, ...)."""
    return _data_dir("presets", "callbacks")


def packaged_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every packaged recipe; fragments are not recipes of their own."""
    folder = recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _candidate_names(name: str) -> list[str]:
    return [name] if name.endswith(RECIPE_SUFFIXES) else [name + ".yaml", name]


def find_packaged(name: str, folders: tuple[Path, ...] | None = None) -> Path | None:
    """``name`` (``.yaml`` optional, may hold ``/``) inside the packaged folders, else None.

    Only relative names that stay inside a folder: ``../x`` or an absolute path is never looked up.
    """
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    for folder in folders if folders is not None else (recipes_dir(),):
        for candidate in _candidate_names(name):
            path = folder / candidate
            if path.is_file():
                return path
    return None


def resolve_recipe(given: str | Path) -> Path:
    """The recipe file ``given`` names: an existing path as given, else a packaged recipe's name.

    A file at the path always wins, so a local ``ofa_supernet.yaml`` shadows the packaged one.
    """
    path = Path(given)
    if path.is_file():
        return path
    packaged = find_packaged(str(given))
    if packaged is not None:
        return packaged
    names = list(packaged_recipes())
    close = difflib.get_close_matches(path.stem, names, n=5, cutoff=0.5)
    raise RecipeError(
        "recipe file not found, nor a packaged recipe of this name",
        source=str(given),
        allowed="a recipe file, or a packaged recipe's name"
        + (f" such as {', '.join(close)}" if close else " (`lightning-nas ls` lists them)"),
        suggestion=close[0] if close else None,
    )
