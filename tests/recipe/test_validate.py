"""Every class of recipe error: unknown key, wrong type, missing value, missing file, unknown name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_recipe

from lightning_nas.errors import RecipeError
from lightning_nas.recipe.loader import load_recipe

BASE = """
description: test recipe
data: {name: digits, batch_size: 8}
task:
  name: classification
  model: {name: timm, arch: mobilenetv2_050}
trainer: {max_epochs: 2}
callbacks:
  ckpt: {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}
"""


def error_for(tmp_path: Path, *overrides: str, text: str = BASE) -> RecipeError:
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, list(overrides))
    return info.value


def test_unknown_top_level_key_suggests_close_match(tmp_path: Path) -> None:
    error = error_for(tmp_path, "trainr.max_epochs=3")
    assert error.key == "trainr" and error.suggestion == "trainer"
    assert str(tmp_path / "recipe.yaml") in error.render()
    assert "from the command line" in error.render()
    assert "allowed:" in error.render() and "trainer" in str(error.allowed)


def test_unknown_nested_keys(tmp_path: Path) -> None:
    assert error_for(tmp_path, "trainer.max_epoch=3").suggestion == "max_epochs"
    assert error_for(tmp_path, "data.batch_sise=3").suggestion == "batch_size"
    assert error_for(tmp_path, "task.model.arhc=x").key == "task.model.arhc"
    assert error_for(tmp_path, "callbacks.ckpt.init_args.save_lst=true").suggestion == "save_last"


def test_wrong_types(tmp_path: Path) -> None:
    error = error_for(tmp_path, "trainer.max_epochs=abc")
    assert error.key == "trainer.max_epochs" and error.given == "abc" and "int" in error.message
    assert "expected a list of int" in error_for(tmp_path, "data.resolutions=32").message
    assert "bool" in error_for(tmp_path, "data.augment=maybe").message
    assert "one of 'sgd'" in error_for(tmp_path, "task.optimizer=rmsprop").message


def test_missing_required_value(tmp_path: Path) -> None:
    error = error_for(tmp_path, "~task.model.arch")
    assert error.key == "task.model.arch" and "missing required value" in error.message
    assert "missing required value" in error_for(tmp_path, text=BASE.replace("description: test recipe", "")).message


def test_missing_files_and_directories(tmp_path: Path) -> None:
    error = error_for(tmp_path, "data={name: npz, train_path: /no/such.npz}")
    assert error.key == "data.train_path" and "file not found" in error.message
    error = error_for(tmp_path, "data={name: cifar10}")  # the default root, data/cifar10, is absent
    assert error.key == "data.root" and "directory not found" in error.message
    assert "download=true" in str(error.allowed)
    load_recipe(write_recipe(tmp_path, BASE), ["data={name: cifar10, download: true, root: " + str(tmp_path / "c") + "}"])


def test_unknown_component_names(tmp_path: Path) -> None:
    error = error_for(tmp_path, "data.name=cifar11")
    assert error.key == "data.name" and error.suggestion == "cifar10" and "digits" in str(error.allowed)
    assert error_for(tmp_path, "task.model.name=tim").suggestion == "timm"
    assert error_for(tmp_path, "logger=wandbb").suggestion == "wandb"
    error = error_for(tmp_path, "callbacks.ckpt.class_path=lightning.pytorch.callbacks.ModelCheckpoin")
    assert error.suggestion == "ModelCheckpoint"
    assert "no module named" in error_for(tmp_path, "callbacks.ckpt.class_path=nowhere.Thing").message


def test_framework_managed_trainer_keys(tmp_path: Path) -> None:
    assert "run_dir" in error_for(tmp_path, "trainer.default_root_dir=x").message


def test_valid_recipe_passes(tmp_path: Path) -> None:
    config = load_recipe(write_recipe(tmp_path, BASE), ["logger=[csv, wandb]", "trainer.devices=2"]).config
    assert config["logger"] == ["csv", "wandb"]


SUPERNET = "recipes/ofa_supernet.yaml"


@pytest.mark.parametrize(
    ("override", "key", "fragments"),
    [
        ("task.lr=-1", "task.lr", ["out of range", "float > 0"]),
        ("task.lr=0", "task.lr", ["float > 0"]),
        ("data.holdout_size=-5", "data.holdout_size", ["int >= 0"]),
        ("data.batch_size=0", "data.batch_size", ["int >= 1"]),
        ("task.label_smoothing=1.5", "task.label_smoothing", ["float in [0, 1]"]),
        ("data.resolutions=[7]", "data.resolutions", ["resolution 7", "[24, 28, 32]"]),
        ("data.resolutions=[24, 30]", "data.resolutions", ["resolution 30"]),
        ("space.stage_strides=[3,2,2,1,2]", "task.space", ["stage_strides must be 1 or 2"]),
        ("space.num_classes=0", "task.space", ["num_classes must be positive"]),
        ("callbacks.progressive_shrinking.init_args.phases=[{name: full, epochs: 0, lr: 0.1}]",
         "callbacks.progressive_shrinking.init_args.phases[0].epochs", ["int >= 1"]),
    ],
)
def test_value_constraints_fail_in_the_validation_pass(override: str, key: str, fragments: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(SUPERNET, [override])
    assert info.value.key == key
    assert all(f in info.value.render() for f in fragments), info.value.render()


def test_search_and_profile_ranges(tmp_path: Path) -> None:
    predictor = tmp_path / "predictor.pt"
    predictor.touch()  # validation only needs it to exist
    with pytest.raises(RecipeError, match="float in \\[0, 1\\]") as info:
        load_recipe("recipes/apq_int8.yaml", [f"search.predictor={predictor}", "search.mutation_prob=2"])
    assert info.value.key == "search.mutation_prob"
    with pytest.raises(RecipeError, match=r"bit_choices \[9\] not supported; allowed bit widths: \[2, 3"):
        load_recipe("recipes/apq_int8.yaml", [f"search.predictor={predictor}", "search.policy_bits=[4, 9]"])
    with pytest.raises(RecipeError, match="bit_choices has duplicates") as info:
        load_recipe("recipes/qat_finetune.yaml", [f"task.supernet_checkpoint={predictor}", "task.bit_choices=[4, 4]"])
    assert info.value.key == "task.bit_choices"
    with pytest.raises(RecipeError, match="resolution 7 is not one the profiled space takes"):
        load_recipe("recipes/latency_lut_cpu.yaml", ["profile.resolutions=[7]"])


@pytest.mark.parametrize(("override", "key"), [("task.lr=-1", "task.lr"), ("data.resolutions=[7]", "data.resolutions"),
                                             ("data.holdout_size=-1", "data.holdout_size"),
                                             ("space.stage_strides=[3,2,2,1,2]", "task.space")])
def test_the_cli_refuses_them_within_2_s_without_importing_torch(override: str, key: str) -> None:
    import subprocess
    import sys

    code = ("import sys, time; t = time.perf_counter()\n"
            "from lightning_nas.cli import main\n"
            f"rc = main(['fit', {SUPERNET!r}, {override!r}])\n"
            "print(rc, time.perf_counter() - t, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, seconds, torch_imported = result.stdout.split()
    assert rc == "2" and torch_imported == "False", result.stderr
    assert float(seconds) < 2.0
    assert f"{SUPERNET}: {key}:" in result.stderr
