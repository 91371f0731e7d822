"""Composition, interpolation and overrides of recipes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import write_recipe

from lightning_nas.errors import RecipeError
from lightning_nas.recipe.loader import load_recipe, parse_override

BASE = """
description: test recipe
data: {name: digits, batch_size: 8, num_workers: 0}
task:
  name: classification
  model: {name: timm, arch: mobilenetv2_050}
  num_classes: 10
trainer: {max_epochs: 2, accelerator: cpu}
vars: {width: 4}
"""


def test_defaults_compose_fragments_in_order_and_recipe_wins(tmp_path: Path) -> None:
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "preset.yaml").write_text(
        "callbacks:\n  ckpt:\n    class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "    init_args: {save_last: true, dirpath: '${run_dir}/ck'}\n"
        "trainer: {max_epochs: 7, max_steps: 5}\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "frag.yaml").write_text("trainer: {max_steps: 9}\n")
    recipe = write_recipe(tmp_path / "recipes", "defaults: [preset, frag.yaml]\n" + BASE + "run_dir: out/x\n")
    config = load_recipe(recipe).config
    assert config["trainer"] == {"max_epochs": 2, "max_steps": 9, "accelerator": "cpu"}
    assert config["callbacks"]["ckpt"]["init_args"] == {"save_last": True, "dirpath": "out/x/ck"}


def test_replace_marker_swaps_a_fragment_mapping_instead_of_merging(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE.replace("{name: timm, arch: mobilenetv2_050}",
                                                     "{name: proxyless_derived, arch_path: a.json}"))
    merged = write_recipe(tmp_path, "defaults: [base]\ntask:\n  model: {name: timm, arch: mobilenetv2_035}\n",
                          name="merged.yaml")
    replaced = write_recipe(tmp_path, "defaults: [base]\ntask:\n  model: {_replace_: true, name: timm, "
                            "arch: mobilenetv2_035}\n", name="replaced.yaml")
    assert load_recipe(merged, validate=False).config["task"]["model"] == {
        "name": "timm", "arch": "mobilenetv2_035", "arch_path": "a.json"}
    config = load_recipe(replaced, validate=False).config
    assert config["task"]["model"] == {"name": "timm", "arch": "mobilenetv2_035"}
    assert config["task"]["num_classes"] == 10  # the rest of the fragment's task is kept


def test_interpolation_and_default_run_dir_are_resolved_once(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, BASE + "seed: ${vars.width}\n")
    loaded = load_recipe(recipe)
    assert loaded.config["seed"] == 4
    assert loaded.config["name"] == "recipe"
    assert loaded.config["run_dir"].startswith("runs/recipe/")
    assert "${" not in loaded.config["run_dir"]


def test_overrides_nested_lists_booleans_and_delete(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, BASE)
    config = load_recipe(recipe, ["trainer.max_epochs=3", "data.resolutions=[24,28,32]", "data.augment=false",
                                  "~vars.width", "trainer.gradient_clip_val=0.5"]).config
    assert config["trainer"]["max_epochs"] == 3
    assert config["data"]["resolutions"] == [24, 28, 32]
    assert config["data"]["augment"] is False
    assert config["vars"] == {}
    assert config["trainer"]["gradient_clip_val"] == pytest.approx(0.5)


def test_smoke_block_applies_before_command_line(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, BASE + "smoke: [trainer.max_epochs=1, trainer.max_steps=2]\n")
    config = load_recipe(recipe, ["trainer.max_steps=5"], smoke=True).config
    assert config["trainer"]["max_epochs"] == 1 and config["trainer"]["max_steps"] == 5


def test_override_interpolations_resolve_against_the_final_recipe(tmp_path: Path) -> None:
    """A smoke override naming ${run_dir} follows a run_dir changed later on the command line."""
    recipe = write_recipe(tmp_path, BASE.replace("vars: {width: 4}", "vars: {runs: runs}") + "run_dir: ${vars.runs}/x\n"
                          "smoke: ['data.cache=${run_dir}/cache.jsonl']\n")
    config = load_recipe(recipe, [f"vars.runs={tmp_path}"], smoke=True, validate=False).config
    assert config["data"]["cache"] == f"{tmp_path}/x/cache.jsonl"


def test_smoke_without_block_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs a `smoke:` list"):
        load_recipe(write_recipe(tmp_path, BASE), smoke=True)


def test_parse_override_values() -> None:
    assert parse_override("a.b=1e-3") == ("a.b", pytest.approx(1e-3), False)
    assert parse_override("a=[1, 2]") == ("a", [1, 2], False)
    assert parse_override("a=null") == ("a", None, False)
    assert parse_override("~a.b") == ("a.b", None, True)
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("nonsense")


def test_missing_fragment_names_file_and_presets(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "defaults: [nowhere]\n" + BASE)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "fragment not found" in str(info.value) and "nowhere" in str(info.value)
    assert str(recipe) in str(info.value)


def test_fragment_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_bad_interpolation_names_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="seed: cannot resolve"):
        load_recipe(write_recipe(tmp_path, BASE + "seed: ${vars.nope}\n"))


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot parse YAML"):
        load_recipe(write_recipe(tmp_path, "description: [unclosed\n"))


def test_missing_recipe_file() -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("recipes/does_not_exist.yaml")


def test_loading_is_fast_and_torch_free(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe = write_recipe(tmp_path, BASE)
    code = ("import sys, time; t=time.perf_counter(); from lightning_nas.recipe.loader import load_recipe; "
            f"load_recipe({str(recipe)!r}); print(time.perf_counter()-t, 'torch' in sys.modules)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0 and out[1] == "False"
    assert time.perf_counter() - started < 5
