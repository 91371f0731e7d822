"""benchmarks/joint_search_quality.py with small random predictors: every method finds a feasible
candidate at every budget, the separate search keeps its first-stage architecture, and the joint
evolution beats random sampling at the same budget."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from conftest import load_benchmark

SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10}


def save_predictors(tmp_path: Path) -> tuple[Path, Path]:
    from lightning_nas.predictors.accuracy import AccuracyPredictor, QuantAccuracyPredictor, save_predictor
    from lightning_nas.registry import SPACES
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    space = SPACES.build(SPACE)
    torch.manual_seed(0)
    fp32 = AccuracyPredictor(space.encoding_size, hidden=16, layers=2, base_accuracy=50.0)
    quant = QuantAccuracyPredictor(space.encoding_size, QuantPolicySpace().encoding_size(space.num_blocks),
                                   hidden=16, layers=2, base_accuracy=50.0)
    save_predictor(fp32, tmp_path / "fp32.pt")
    save_predictor(quant, tmp_path / "quant.pt")
    return tmp_path / "fp32.pt", tmp_path / "quant.pt"


def test_methods_respect_the_budgets_and_evolution_beats_random(tmp_path: Path) -> None:
    fp32, quant = save_predictors(tmp_path)
    benchmark = load_benchmark("joint_search_quality")
    assert benchmark.main(["--quant-predictor", str(quant), "--fp32-predictor", str(fp32), "--space",
                           json.dumps(SPACE), "--evaluations", "1000", "--seeds", "2", "--no-finetune",
                           "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["budgets"]) == 3 and results["budgets"] == sorted(results["budgets"])
    assert [r["method"] for r in results["rows"]] == list(benchmark.METHODS) * 3
    for row in results["rows"]:
        assert row["costs"]["latency_ms"] <= row["budget_ms"]
        assert len(row["predicted"]) == 2
    for budget in results["budgets"]:
        by_method = {r["method"]: r for r in results["rows"] if r["budget_ms"] == budget}
        assert by_method["joint"]["predicted_mean"] > by_method["random"]["predicted_mean"]


def test_fixed_architecture_search_changes_only_the_policy() -> None:
    from lightning_nas.hardware.cost_models import BitFusionCostModel
    from lightning_nas.predictors.accuracy import QuantAccuracyPredictor
    from lightning_nas.registry import SPACES
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.search.scoring import Scorer
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    benchmark = load_benchmark("joint_search_quality")
    space, policies = SPACES.build(SPACE), QuantPolicySpace()
    config = space.canonical(space.sample(random.Random(3)))
    joint = JointSpace(benchmark.FixedArchitecture(space, config), policies)
    predictor = QuantAccuracyPredictor(space.encoding_size, policies.encoding_size(space.num_blocks), hidden=8, layers=1)
    scorer = Scorer(joint, predictor, {"bitfusion": BitFusionCostModel(SPACE)})
    first, _ = benchmark.evolve(joint, scorer, 400, seed=0)
    second, _ = benchmark.evolve(joint, scorer, 400, seed=1)
    assert first.config == config and second.config == config
    assert first.policy != second.policy


def test_a_rerun_reuses_only_the_finetuning_of_the_same_candidate(tmp_path: Path) -> None:
    benchmark = load_benchmark("joint_search_quality")
    candidate = {"config": {"ks": [3], "r": 32}, "policy": {"pw_w": [8]}}
    assert benchmark.finished_qat(tmp_path, candidate) is None
    (tmp_path / "qat_metrics.json").write_text(json.dumps({**candidate, "test_top1": 57.5}))
    assert benchmark.finished_qat(tmp_path, candidate)["test_top1"] == 57.5
    assert benchmark.finished_qat(tmp_path, {**candidate, "policy": {"pw_w": [4]}}) is None
