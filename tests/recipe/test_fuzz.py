"""Fuzzed recipe layer: random overrides and random YAML documents end in a valid configuration
or a RecipeError (exit 2 from the CLI), never in another exception.

Runs the torch-free path (`lightning_nas.recipe.loader.load_recipe` with validation, and the
``config`` verb of the CLI on top of it). The number of examples is bounded and there is no
per-example deadline, so the tests take a few seconds even on a busy machine; examples are not
stored (no ``.hypothesis`` folder in the repository).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_nas.cli import main
from lightning_nas.errors import USAGE_EXIT_CODE, RecipeError
from lightning_nas.recipe.loader import load_recipe

FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: Keys recipes have, at several depths, so that overrides reach the validators, not only the parser.
KEYS = ["description", "name", "run_dir", "seed", "logger", "ckpt_path", "smoke", "defaults", "vars", "vars.runs",
        "trainer", "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.callbacks",
        "trainer.precision", "task", "task.name", "task.lr", "task.space", "task.space.name", "data",
        "data.name", "data.batch_size", "data.resolutions", "data.holdout_size", "space", "space.name",
        "callbacks", "callbacks.checkpoint", "callbacks.checkpoint.class_path",
        "callbacks.checkpoint.init_args.save_last", "callbacks.pairs.init_args.num_pairs", "search",
        "search.evaluations", "search.constraints", "search.strategy", "search.cost_models", "profile",
        "profile.resolutions", "profile.precisions", "pipeline", "pipeline.stages", "pipeline.stages.0.recipe",
        "export", "export.subnet", "rank", "rank.ranker", "sweep", "wandb", "wandb.project", "a.b.c", "0", "_replace_"]
SPECIAL = "=~+${}[]{}:,.'\"\\#&*!|>%@`-_ \n\t0123456789abcxyz"
VALUES = st.one_of(
    st.text(alphabet=SPECIAL, max_size=24),
    st.sampled_from(["null", "true", "[1, 2]", "{a: 1}", "-1", "1e9", "nan", ".inf", "${run_dir}", "${now:}",
                     "${oc.env:NOPE}", "${vars.missing}", "${seed}", "[", "{", "'", "ofa_mbv3_cifar", "digits",
                     "supernet", "last", "cpu", "[fp32, int8]", "[7]", "{name: counts}", "~", "${"]),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True).map(repr),
)
KEY_TEXT = st.one_of(st.sampled_from(KEYS), st.text(alphabet=SPECIAL, max_size=16))
OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", KEY_TEXT, VALUES),
    st.builds(lambda k: f"~{k}", KEY_TEXT),
    st.text(max_size=30),
), max_size=4)
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(alphabet=SPECIAL, max_size=12), st.sampled_from(["${run_dir}", "${name}", "${x.y}"]))
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(KEY_TEXT, children, max_size=4)),
    max_leaves=12,
)


def outcome(call: Any) -> str:
    """'ok' or 'error' (a RecipeError that renders); any other exception fails the test."""
    try:
        call()
    except RecipeError as error:
        assert error.render().strip()
        return "error"
    return "ok"


def cli_code(arguments: list[str]) -> int:
    """The CLI's exit code, with its output swallowed (argparse exits 2 on what it refuses)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(arguments)
        except SystemExit as stop:
            return int(stop.code or 0)


@FUZZ
@given(recipe=st.sampled_from(RECIPES), overrides=OVERRIDES, smoke=st.booleans())
def test_random_overrides_of_real_recipes(recipe: str, overrides: list[str], smoke: bool) -> None:
    path = REPO / "recipes" / recipe

    def load() -> None:
        loaded = load_recipe(path, overrides, smoke=smoke)
        assert isinstance(loaded.config, dict) and loaded.config["run_dir"]

    outcome(load)
    assert cli_code(["config", str(path), *overrides, *(["--smoke"] if smoke else [])]) in (0, USAGE_EXIT_CODE)


def mutate(document: dict, key: str, value: Any) -> dict:
    node = document
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value
    return document


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(document=DOCUMENTS)
def test_random_yaml_documents(document: Any, folder: Path) -> None:
    path = folder / "random.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    outcome(lambda: load_recipe(path))
    assert cli_code(["config", str(path)]) in (0, USAGE_EXIT_CODE)


@FUZZ
@given(text=st.text(alphabet=SPECIAL + "\x00\u00e9\ufeff", max_size=80))
def test_random_text_as_a_recipe(text: str, folder: Path) -> None:
    path = folder / "text.yaml"
    path.write_text(text, encoding="utf-8")
    outcome(lambda: load_recipe(path, smoke=True))


@FUZZ
@given(recipe=st.sampled_from(RECIPES), edits=st.lists(st.tuples(st.sampled_from(KEYS), DOCUMENTS), min_size=1,
                                                       max_size=3))
def test_real_recipes_with_random_values(recipe: str, edits: list[tuple[str, Any]], folder: Path) -> None:
    document = yaml.safe_load((REPO / "recipes" / recipe).read_text(encoding="utf-8"))
    document.pop("defaults", None)  # the copy lives outside the project: no presets to find
    for key, value in edits:
        document = mutate(document, key, value)
    path = folder / recipe
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    outcome(lambda: load_recipe(path))


def test_the_fuzzers_reach_both_outcomes() -> None:
    """Not vacuous: the strategies above produce valid recipes as well as refused ones."""
    path = REPO / "recipes" / "classify_timm.yaml"
    assert outcome(lambda: load_recipe(path, ["trainer.max_epochs=3"])) == "ok"
    assert outcome(lambda: load_recipe(path, ["trainer.max_epochs=[3"])) == "error"
