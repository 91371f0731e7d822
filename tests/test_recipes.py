"""Every recipe in recipes/ validates and runs end to end with --smoke, in pipeline order.

Recipes that read an earlier stage's artifacts do it through ``${vars.runs}``; the test points that
(and every run directory) into a temporary folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import REPO, SHARED

from lightning_nas.cli import main, recipe_verb
from lightning_nas.recipe.loader import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
#: Pipelines run every stage's smoke run: longer than the budget of one recipe, tested apart.
PIPELINES = [p for p in RECIPES if "\npipeline:" in p.read_text()]
STAGE_RECIPES = [p for p in RECIPES if p not in PIPELINES]
#: Stages that produce what later recipes read come first.
PIPELINE_ORDER = ["ofa_supernet", "ofa_export", "qat_finetune", "pairs_fp32", "predictor_fp32", "pairs_quant",
                  "predictor_quant", "apq_int8", "proxylessnas", "proxylessnas_train",
                  "ofa_supernet_cifar10", "pairs_fp32_cifar10", "predictor_fp32_cifar10", "pairs_quant_cifar10",
                  "predictor_quant_cifar10", "proxylessnas_cifar10", "proxylessnas_train_cifar10",
                  "resnet20_cifar10", "mqbench_cifar10", "emq_search", "emq_allocate"]
#: The issue's budget; raise it only to check correctness on a machine shared with other work.
SMOKE_SECONDS = float(os.environ.get("LIGHTNING_NAS_SMOKE_SECONDS", 60))


def ordered(paths: list[Path]) -> list[Path]:
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    return sorted(paths, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def test_every_recipe_has_description_and_smoke_block() -> None:
    assert RECIPES
    for path in RECIPES:
        config = load_recipe(path, ["vars.runs=/tmp/unused"] if "runs" in path.read_text() else [],
                             validate=False).config
        assert config.get("description"), path
        assert config.get("smoke"), f"{path} has no smoke: block"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


#: Stems skipped in this session: a recipe reading their artifacts is skipped too.
SKIPPED_STAGES: set[str] = set()


@pytest.mark.parametrize("path", ordered(STAGE_RECIPES), ids=lambda p: p.stem)
def test_recipe_runs_with_smoke(path: Path, runs_dir: Path) -> None:
    overrides = [f"run_dir={runs_dir / path.stem}"]
    config = load_recipe(path, overrides, smoke=True, validate=False).config
    if "runs" in config.get("vars", {}):
        overrides.append(f"vars.runs={runs_dir}")
    resolved = repr(load_recipe(path, overrides, smoke=True, validate=False).config)
    if "../shared/" in resolved and not SHARED.is_dir():
        SKIPPED_STAGES.add(path.stem)
        pytest.skip("reads ../shared (benchmark data beside the repository)")
    needed = sorted(stem for stem in SKIPPED_STAGES if f"{runs_dir / stem}/" in resolved)
    if needed:
        SKIPPED_STAGES.add(path.stem)
        pytest.skip(f"reads the artifacts of {', '.join(needed)}, skipped")
    verb = recipe_verb(config)
    started = time.perf_counter()
    assert main([verb, str(path), "--smoke", *overrides]) == 0
    elapsed = time.perf_counter() - started
    assert (runs_dir / path.stem / "config.yaml").is_file()
    assert elapsed < SMOKE_SECONDS, f"{path.name} --smoke took {elapsed:.1f}s"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_stages_load_and_validate(path: Path, tmp_path: Path) -> None:
    from lightning_nas.recipe.sections import PipelineStage
    from lightning_nas.stages.pipeline import load_stage, stage_recipe_path, validate_ahead

    config = load_recipe(path, [f"run_dir={tmp_path}"]).config
    for index, given in enumerate(config["pipeline"]["stages"]):
        stage = PipelineStage(**given)
        for smoke in (False, True):
            loaded = load_stage(path, stage_recipe_path(path, stage.recipe, index), tmp_path, stage, smoke, False)
            validate_ahead(loaded, tmp_path)
            assert str(loaded.config["run_dir"]).startswith(str(tmp_path)), stage.recipe


@pytest.mark.slow  # every stage's smoke run in one process: a few minutes on 2 cores
@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_runs_with_smoke_then_reuses_every_stage(path: Path, tmp_path: Path) -> None:
    import csv

    assert main(["pipeline", str(path), "--smoke", f"run_dir={tmp_path}"]) == 0
    assert main(["pipeline", str(path), "--smoke", f"run_dir={tmp_path}"]) == 0
    rows = list(csv.DictReader((tmp_path / "pipeline.csv").open()))
    assert rows and all(row["status"] == "reused" for row in rows)
