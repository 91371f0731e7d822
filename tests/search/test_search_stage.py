"""``lightning-nas search``: the stage end to end, its outputs read back, and the APQ recipe's smoke run.

The quantized-pair pipeline that writes ``runs/predictor_quant/predictor.pt`` does not exist yet,
so these tests train a tiny predictor on synthetic encodings and save it where recipes look.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_recipe

from lightning_nas.errors import RecipeError
from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel
from lightning_nas.predictors.accuracy import AccuracyPredictor, QuantAccuracyPredictor, save_predictor
from lightning_nas.predictors.encoding import encode_pairs
from lightning_nas.recipe.loader import load_recipe
from lightning_nas.recipe.signature import signature_of
from lightning_nas.recipe.validate import validate_arguments
from lightning_nas.registry import COST_MODELS, Entry
from lightning_nas.search.joint_space import JointSpace
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.quant_policy import QuantPolicySpace
from lightning_nas.stages import search as stage

Row = namedtuple("Row", "arch policy top1")
COST_MODEL_TARGETS = {
    "counts": "lightning_nas.hardware.cost_models:CountsCostModel",
    "latency_table": "lightning_nas.hardware.cost_models:LatencyTableCostModel",
    "bitfusion": "lightning_nas.hardware.cost_models:BitFusionCostModel",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cost_models_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the cost models for these tests if the catalog does not (yet) name them."""
    entries = dict(COST_MODELS._entries)
    for name, target in COST_MODEL_TARGETS.items():
        entries.setdefault(name, Entry(name, target, name))
    monkeypatch.setattr(COST_MODELS, "_entries", entries)


def train_predictor(path: Path, quantized: bool = True, seed: int = 0) -> Path:
    """A tiny predictor fitted to a known ranking: bigger kernels, ratios, depth, resolution and
    bits are better."""
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    policies = QuantPolicySpace() if quantized else None
    joint = JointSpace(space, policies)
    rng = random.Random(seed)
    rows = []
    for _ in range(256):
        c = joint.sample(rng)
        active = space.active_blocks(c.config)
        top1 = 60 + 0.3 * sum(c.config["ks"][b] + c.config["e"][b] for b in active) + 0.5 * (c.config["r"] - 24)
        if c.policy is not None:
            top1 += 0.1 * sum(c.policy["pw_w"][b] + c.policy["dw_a"][b] for b in active)
        rows.append(Row(c.config, c.policy, top1))
    archs, encoded_policies, targets = encode_pairs(space, policies, rows)
    torch.manual_seed(seed)
    if quantized:
        model = QuantAccuracyPredictor(space.encoding_size, policies.encoding_size(space.num_blocks), hidden=32,
                                       layers=2, base_accuracy=float(targets.mean()))
    else:
        model = AccuracyPredictor(space.encoding_size, hidden=32, layers=2, base_accuracy=float(targets.mean()))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(archs, encoded_policies), targets)
        loss.backward()
        optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predictors")
    return {"quant": train_predictor(root / "predictor_quant" / "predictor.pt"),
            "fp32": train_predictor(root / "predictor_fp32" / "predictor.pt", quantized=False)}


RECIPE = """
description: test search
run_dir: {run_dir}
seed: 0
logger: {logger}
space: {{name: ofa_mbv3_cifar}}
search:
  space: ${{space}}
  predictor: {predictor}
  policy_bits: {bits}
  cost_models:
    - {{name: counts, space: "${{space}}"}}
    - {{name: bitfusion, space: "${{space}}"}}
  constraints: {constraints}
  strategy: {strategy}
  evaluations: {evaluations}
  population: 40
  parents: 10
  mutations: 20
  top_k: 5
  progress: {progress}
"""


def run_stage(tmp_path: Path, predictor: Path, strategy: str = "apq_evolution", evaluations: int = 400,
              constraints: str = "{latency_ms: 0.45, energy_mj: 0.6, bitops: 6.0e8}", bits: str = "[4, 6, 8]",
              logger: str = "csv", progress: bool = False) -> Path:
    path = write_recipe(tmp_path, RECIPE.format(run_dir=tmp_path / "run", predictor=predictor, strategy=strategy,
                                                evaluations=evaluations, constraints=constraints, bits=bits,
                                                logger=logger, progress=str(progress).lower()))
    return stage.run(load_recipe(path, validate=False))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_search_settings_validate_from_source(predictors) -> None:
    config = load_recipe(REPO / "recipes" / "apq_int8.yaml", [f"vars.runs={predictors['quant'].parents[1]}"],
                         smoke=True, validate=False).config
    signature = signature_of("lightning_nas.recipe.search_settings:SearchSettings")
    validate_arguments(signature, config["search"], "search")
    with pytest.raises(RecipeError, match="unknown key") as caught:
        validate_arguments(signature, {**config["search"], "evaluation": 5}, "search")
    assert caught.value.suggestion == "evaluations"
    with pytest.raises(RecipeError, match="expected one of"):
        validate_arguments(signature, {**config["search"], "strategy": "bayes"}, "search")


def test_stage_writes_topk_pareto_csv_and_plot(tmp_path: Path, predictors, capsys) -> None:
    run_dir = run_stage(tmp_path, predictors["quant"])
    out = capsys.readouterr().out
    assert "candidates/s" in out
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    assert topk["strategy"] == "apq_evolution" and topk["evaluations"] == 400 and topk["candidates_per_second"] > 0
    assert topk["metrics"] == ["macs", "params", "bitops", "size_bytes", "latency_ms", "energy_mj"]
    top = topk["topk"]
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert all(a["accuracy"] >= b["accuracy"] for a, b in zip(top, top[1:]))
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    configs, policies = [t["config"] for t in top], [t["policy"] for t in top]
    direct = {**CountsCostModel(space).evaluate(configs, policies), **BitFusionCostModel(space).evaluate(configs, policies)}
    for metric, limit in topk["constraints"].items():
        assert (direct[metric] <= limit).all()
        np.testing.assert_allclose([t["costs"][metric] for t in top], direct[metric])

    rows = read_csv(run_dir / "search" / "pareto.csv")
    assert len(rows) == 400
    assert {"accuracy", "latency_ms", "energy_mj", "bitops", "feasible", "on_front", "config", "policy"} <= set(rows[0])
    front = [r for r in rows if r["on_front"] == "1"]
    assert len(front) == topk["front_size"] > 0 and all(r["feasible"] == "1" for r in front)
    for f in front:  # nothing feasible is cheaper and more accurate than a front member
        assert not any(float(r["latency_ms"]) <= float(f["latency_ms"]) and float(r["accuracy"]) > float(f["accuracy"])
                       for r in rows if r["feasible"] == "1")
    best = max(rows, key=lambda r: float(r["accuracy"]))
    assert json.loads(best["config"]) == top[0]["config"] and json.loads(best["policy"]) == top[0]["policy"]
    assert (run_dir / "search" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "search/candidates_per_second" in metrics and "search/best_accuracy" in metrics


def test_progress_bar_counts_the_scored_candidates_on_stderr(tmp_path: Path, predictors, capsys) -> None:
    run_stage(tmp_path, predictors["quant"], evaluations=100, progress=True)
    printed = capsys.readouterr()
    assert "search (apq_evolution)" in printed.err and "100/100 cand" in printed.err
    assert "search (apq_evolution)" not in printed.out
    (tmp_path / "quiet").mkdir()
    run_stage(tmp_path / "quiet", predictors["quant"], evaluations=100)
    assert "search (" not in capsys.readouterr().err


def test_apq_recipe_smoke_run_is_fast(tmp_path: Path, predictors) -> None:
    runs = predictors["quant"].parents[1]
    recipe = load_recipe(REPO / "recipes" / "apq_int8.yaml", [f"vars.runs={runs}", f"run_dir={tmp_path / 'apq'}"],
                         smoke=True, validate=False)
    started = time.perf_counter()
    run_dir = stage.run(recipe)
    assert time.perf_counter() - started < 60
    for name in ("topk.json", "pareto.csv", "pareto.png"):
        assert (run_dir / "search" / name).is_file()
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    assert topk["evaluations"] == recipe.config["search"]["evaluations"]
    assert all(t["costs"][m] <= limit for t in topk["topk"] for m, limit in topk["constraints"].items())


def test_infeasible_constraint_is_a_recipe_error_with_the_smallest_value(tmp_path: Path, predictors) -> None:
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"smallest found: 2\.\d+e\+08, never met") as caught:
        run_stage(tmp_path, predictors["quant"], constraints="{bitops: 1.0e6}")
    assert time.perf_counter() - started < 30
    assert caught.value.key == "search.constraints"
    with pytest.raises(RecipeError, match="no cost model reports it") as caught:
        run_stage(tmp_path, predictors["quant"], constraints="{latency: 1.0}")
    assert caught.value.key == "search.constraints"


@pytest.mark.parametrize("strategy", ["apq_evolution", "random", "regularized_evolution", "grid", "tpe"])
def test_every_strategy_runs_through_nni_with_the_same_outputs(tmp_path: Path, predictors, strategy: str) -> None:
    run_dir = run_stage(tmp_path, predictors["quant"], strategy=strategy, evaluations=60,
                        constraints="{latency_ms: 0.5, bitops: 8.0e8}")
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    assert topk["evaluations"] == 60 and topk["nni_experiment_dir"].startswith(str(run_dir / "search" / "nni"))
    assert topk["engine"] == "batched" and topk["concurrency"] == (40 if strategy == "regularized_evolution" else 100)
    assert Path(topk["nni_experiment_dir"], "checkpoint", "config.json").is_file()
    assert ("generations" in topk) == (strategy == "apq_evolution")
    rows = read_csv(run_dir / "search" / "pareto.csv")
    assert len(rows) == 60 and (run_dir / "search" / "pareto.png").is_file()
    assert topk["topk"] and all(t["costs"]["latency_ms"] <= 0.5 and t["costs"]["bitops"] <= 8.0e8 for t in topk["topk"])
    assert sum(r["feasible"] == "1" for r in rows) == topk["feasible"]


def test_concurrency_must_be_positive(tmp_path: Path, predictors) -> None:
    path = write_recipe(tmp_path, RECIPE.format(run_dir=tmp_path / "run", predictor=predictors["quant"],
                                                strategy="random", evaluations=10, constraints="{}",
                                                bits="[4, 6, 8]", logger="csv", progress="false") + "  concurrency: 0\n")
    with pytest.raises(RecipeError, match="must be at least 1") as caught:
        stage.run(load_recipe(path, validate=False))
    assert caught.value.key == "search.concurrency"


def test_full_precision_search(tmp_path: Path, predictors) -> None:
    run_dir = run_stage(tmp_path, predictors["fp32"], bits="null", constraints="{macs: 2.0e7}", evaluations=200)
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    assert all(t["policy"] is None and t["costs"]["macs"] <= 2e7 for t in topk["topk"])
    with pytest.raises(RecipeError, match="quantization-aware predictor"):
        run_stage(tmp_path, predictors["fp32"])


def test_wandb_gets_the_table_and_the_plot(tmp_path: Path, predictors, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run_stage(tmp_path, predictors["quant"], evaluations=200, logger="wandb")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = {p.relative_to(runs[0] / "files").as_posix() for p in (runs[0] / "files").rglob("*") if p.is_file()}
    for prefix, suffix in (("media/table/search/topk", ".table.json"), ("media/table/search/front", ".table.json"),
                           ("media/images/search/pareto", ".png")):
        assert any(m.startswith(prefix) and m.endswith(suffix) for m in media), (prefix, media)


def test_a_predictor_of_another_target_is_not_mixed_in(tmp_path: Path, predictors) -> None:
    import torch

    from lightning_nas.errors import RecipeError
    from lightning_nas.recipe.search_settings import SearchSettings
    from lightning_nas.targets import resolve_target

    host = resolve_target("auto").name
    other = "x86_avx2/torch" if host != "x86_avx2/torch" else "x86_vnni/torch"
    saved = torch.load(predictors["quant"], weights_only=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({**saved, "target": other}, foreign)
    settings = dict(space={"name": "ofa_mbv3_cifar"}, predictor=str(foreign),
                    cost_models=[{"name": "counts", "space": {"name": "ofa_mbv3_cifar"}}])
    with pytest.raises(RecipeError, match=rf"search.target: .*predictor {foreign}: {other}.*expected {host}"):
        stage.build_scorer(SearchSettings(**settings))
    assert stage.build_scorer(SearchSettings(**settings, allow_mixed_targets=True)) is not None
    assert stage.build_scorer(SearchSettings(**settings, target=other)) is not None
    # the search records its target for the QAT of a candidate
    run_dir = run_stage(tmp_path, predictors["quant"], evaluations=100)
    assert json.loads((run_dir / "search" / "topk.json").read_text())["target"] == host


def test_a_latency_table_of_another_target_is_refused_and_its_validation_reaches_the_outputs(
        tmp_path: Path, predictors, capsys) -> None:
    from lightning_nas.hardware.latency_keys import space_units
    from lightning_nas.hardware.latency_table import LatencyTable
    from lightning_nas.recipe.search_settings import SearchSettings
    from lightning_nas.targets import resolve_target

    host = resolve_target("auto").name
    other = "x86_avx2/torch" if host != "x86_avx2/torch" else "x86_vnni/torch"
    entries = {u.key: {"median": 0.01} for u in space_units(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"))}
    validation = {"subnets": 30, "min_spearman": 0.9, "passed": False,
                  "precisions": {"fp32": {"spearman": 0.62, "median_abs_pct_error": 11.0, "passed": False}}}

    def table(target: str) -> str:
        path = tmp_path / f"{target.replace('/', '_')}.json"
        LatencyTable({"target": target, "validation": validation}, {"fp32": entries}).save(path)
        return str(path)

    settings = dict(space={"name": "ofa_mbv3_cifar"}, predictor=str(predictors["quant"]), evaluations=100,
                    population=40, parents=10, mutations=20, progress=False,
                    cost_models=[{"name": "latency_table", "space": {"name": "ofa_mbv3_cifar"}, "table": table(other)}])
    with pytest.raises(RecipeError, match=rf"search.target: .*cost model latency_table: {other}.*allow_mixed_targets"):
        stage.build_scorer(SearchSettings(**settings))
    assert stage.build_scorer(SearchSettings(**settings, allow_mixed_targets=True)) is not None

    recipe = RECIPE.format(run_dir=tmp_path / "run", predictor=predictors["quant"], strategy="apq_evolution",
                           evaluations=100, constraints="{}", bits="[4, 6, 8]", logger="csv", progress="false").replace(
        '    - {name: bitfusion, space: "${space}"}',
        f'    - {{name: latency_table, space: "${{space}}", table: {table(host)}}}')
    run_dir = stage.run(load_recipe(write_recipe(tmp_path, recipe), validate=False))
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    carried = topk["cost_model_validation"]["latency_table"]["fp32"]
    assert carried["spearman"] == 0.62 and carried["subnets"] == 30 and carried["passed"] is False
    assert "counts" not in topk["cost_model_validation"]
    assert "WARNING: cost model latency_table (fp32): its latency table failed validation" in capsys.readouterr().out
