"""Packaged recipes: names resolve to them, a file on disk wins, copies find what they leave behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO

from lightning_nas.errors import RecipeError
from lightning_nas.recipe import packaged
from lightning_nas.recipe.loader import load_recipe, project_root
from lightning_nas.recipe.packaged import (
    find_packaged,
    packaged_recipes,
    presets_dir,
    recipes_dir,
    resolve_recipe,
)


def test_a_checkout_packages_its_own_top_level_folders() -> None:
    assert recipes_dir() == REPO / "recipes" and presets_dir() == REPO / "callbacks"
    assert set(packaged_recipes()) == {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert "cifar10_space" not in packaged_recipes()  # fragments are not recipes of their own


def test_an_installed_package_uses_its_data_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "lightning_nas"
    (package / "recipes").mkdir(parents=True)
    (package / "presets").mkdir()
    (package / "recipes" / "only_here.yaml").write_text("description: installed\n")
    monkeypatch.setattr(packaged, "_PACKAGE", package)
    assert recipes_dir() == package / "recipes" and presets_dir() == package / "presets"
    assert list(packaged_recipes()) == ["only_here"]


@pytest.mark.parametrize("name", ["ofa_supernet", "ofa_supernet.yaml"])
def test_a_name_finds_the_packaged_recipe_from_any_directory(name: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(name) == REPO / "recipes" / "ofa_supernet.yaml"
    loaded = load_recipe(name)
    assert loaded.path == REPO / "recipes" / "ofa_supernet.yaml"
    assert loaded.config["name"] == "ofa_supernet" and loaded.config["task"]["name"] == "supernet"
    # its presets came from the packaged callbacks/ although nothing is beside the working directory
    assert loaded.source_of("callbacks.progressive_shrinking") == str(REPO / "callbacks" / "progressive_shrinking.yaml")


def test_an_existing_file_wins_over_the_packaged_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = (REPO / "recipes" / "ofa_supernet.yaml").read_text().replace(
        "description: Once-for-all", "description: my own Once-for-all")
    (tmp_path / "ofa_supernet.yaml").write_text(text)
    assert resolve_recipe("ofa_supernet.yaml") == Path("ofa_supernet.yaml")
    assert load_recipe("ofa_supernet.yaml").config["description"].startswith("my own")
    assert resolve_recipe("ofa_supernet") == REPO / "recipes" / "ofa_supernet.yaml"  # no file of that name here


def test_an_unknown_name_lists_close_matches() -> None:
    with pytest.raises(RecipeError, match="recipe file not found") as info:
        resolve_recipe("ofa_supernt")
    assert info.value.suggestion == "ofa_supernet"
    assert "ofa_supernet_cifar10" in info.value.allowed and info.value.source == "ofa_supernt"
    with pytest.raises(RecipeError, match="lightning-nas ls"):
        resolve_recipe("zzzz_qqqq")


@pytest.mark.parametrize("name", ["../recipes/ofa_supernet.yaml", "/etc/hostname"])
def test_names_never_leave_the_packaged_folder(name: str) -> None:
    assert find_packaged(name) is None


def test_a_copied_recipe_loads_its_fragments_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fragments/cifar10_space is a packaged recipe fragment; default, progressive_shrinking presets
    original = load_recipe("recipes/ofa_supernet_cifar10.yaml", ["data.root=."]).config
    copy = tmp_path / "edit" / "ofa_supernet_cifar10.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "recipes" / "ofa_supernet_cifar10.yaml", copy)
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(copy, ["data.root=."])
    assert loaded.config == original
    assert loaded.source_of("space") == str(REPO / "recipes" / "fragments" / "cifar10_space.yaml")
    # a fragment beside the copy is preferred: copy it too to edit it
    (copy.parent / "fragments").mkdir()
    edited = (REPO / "recipes" / "fragments" / "cifar10_space.yaml").read_text().replace(
        "num_classes: 10", "num_classes: 7")
    (copy.parent / "fragments" / "cifar10_space.yaml").write_text(edited)
    mine = load_recipe(copy, ["data.root=."])
    assert mine.config["space"]["num_classes"] == 7 and mine.config["task"]["space"]["num_classes"] == 7
    assert mine.source_of("space.num_classes") == str(copy.parent / "fragments" / "cifar10_space.yaml")


def test_a_folder_of_python_callbacks_is_not_a_preset_folder(tmp_path: Path) -> None:
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "shrinking.py").write_text("")
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("")
    assert project_root(recipe) is None
    (tmp_path / "callbacks" / "default.yaml").write_text("")
    assert project_root(recipe) == tmp_path
