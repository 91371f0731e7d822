"""`lightning-nas deploy`: int8 / ONNX deployment of the subnet a QAT run finetuned, read from its run directory.

The QAT runs (one per deployment target, of a tiny supernet trained on digits) come from the session
fixtures of ``conftest.py``; each target's deployment runs the shipped recipe through the CLI. A
target whose int8 arithmetic this host does not compute natively is skipped, never assumed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TARGET_NAMES, TINY_DATA, QATRuns, target_param

from lightning_nas.cli import main
from lightning_nas.errors import RecipeError
from lightning_nas.recipe.sections import DeploySettings
from lightning_nas.stages.deploy import data_section, deploy_target, find_qat_subnet, read_record
from lightning_nas.targets import resolve_target
from lightning_nas.tasks.qat import QAT_SUBNET_FILE

RECIPE = "recipes/deploy_int8.yaml"


def deploy_arguments(qat_subnet: Path, run_dir: Path, target: str, *extra: str) -> list[str]:
    return ["deploy", RECIPE, f"deploy.qat_subnet={qat_subnet}", f"deploy.target={target}", f"run_dir={run_dir}",
            "data=" + json.dumps(TINY_DATA), "deploy.agreement_images=1000", "deploy.calibration_images=100",
            "deploy.calibration_batch=100", "deploy.latency_warmup=1", "deploy.latency_repeats=3",
            "deploy.progress=false", *extra]


@pytest.fixture(scope="module", params=[target_param(n) for n in TARGET_NAMES])
def deployed(request: pytest.FixtureRequest, qat_runs: QATRuns, tmp_path_factory: pytest.TempPathFactory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetuned = qat_runs.get(request.param)
        run_dir = tmp_path_factory.mktemp("deploy")
        assert main(deploy_arguments(finetuned["root"] / QAT_SUBNET_FILE, run_dir, request.param)) == 0
    finally:
        torch.set_num_threads(threads)
    return {**finetuned, "run_dir": run_dir, "latency": json.loads((run_dir / "latency.json").read_text())}


def test_int8_and_onnx_agree_with_fake_quantized_model(deployed: dict) -> None:
    latency = deployed["latency"]
    agreement = latency["agreement"]
    assert agreement["images"] == 359  # the whole digits test split
    assert agreement["int8_vs_fake_quant"] >= 99.0, agreement
    target = resolve_target(deployed["task"].target)
    if target.runtime == "onnxruntime":  # trained with the int32 bias grid ONNX Runtime adds
        assert agreement["onnx_vs_fake_quant"] >= 99.0, agreement
    else:
        # onnxruntime rounds conv biases to int32 (scale = input scale x weight scale), which neither
        # training nor the onednn kernels do: a small per-layer offset that a barely trained net feels
        assert agreement["onnx_vs_fake_quant"] >= 95.0, agreement
    # every tensor the int8 model rounds had its range learned in training
    assert latency["calibrated_tensors"] == 0
    assert latency["target"] == target.name == deployed["metrics"]["target"]
    assert latency["int8_backend"] == target.engine and latency["weight_qmax"] == target.weight_qmax
    assert latency["config"] == deployed["metrics"]["config"]
    # the fake-quantized top-1 on the same images is the QAT run's own test figure
    assert latency["top1"]["fake_quant"] == pytest.approx(deployed["metrics"]["test_top1"], abs=1e-3)
    assert Path(latency["onnx"]) == deployed["run_dir"] / "model_int8.onnx" and Path(latency["onnx"]).is_file()
    assert Path(latency["onnx_fp32"]) == deployed["run_dir"] / "model_fp32.onnx" and Path(latency["onnx_fp32"]).is_file()


def test_deployment_figures_are_logged(deployed: dict) -> None:
    rows = list(csv.DictReader((deployed["run_dir"] / "logs" / "metrics.csv").open()))
    assert len(rows) == 1
    agreement = deployed["latency"]["agreement"]
    assert float(rows[0]["deploy/agreement_int8"]) == pytest.approx(agreement["int8_vs_fake_quant"])
    assert float(rows[0]["deploy/agreement_onnx"]) == pytest.approx(agreement["onnx_vs_fake_quant"])
    speedup = deployed["latency"]["speedup_torch_int8"]["batch_1"]
    assert float(rows[0]["deploy/speedup_torch_int8_b1"]) == pytest.approx(speedup)


def test_the_int8_onnx_file_runs_with_the_tests_batch_size(deployed: dict) -> None:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(deployed["run_dir"] / "model_int8.onnx"),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 16, 16), np.float32)})
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_latency_report_has_both_batch_sizes(deployed: dict) -> None:
    results = deployed["latency"]["results"]
    assert set(results) == {"torch_fp32", "torch_int8", "onnxruntime_fp32", "onnxruntime_int8"}
    for runner in results.values():
        assert set(runner) == {"batch_1", "batch_32"}
        assert runner["batch_1"]["median_ms"] > 0 and runner["batch_32"]["repeats"] == 3
    for runtime in ("torch", "onnxruntime"):
        assert deployed["latency"][f"speedup_{runtime}_int8"]["batch_32"] > 0
    assert deployed["latency"]["input_shape"] == [3, 16, 16]


def test_a_missing_qat_artifact_names_the_key_the_path_and_the_stage_that_writes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "qat_finetune" / QAT_SUBNET_FILE
    run_dir = tmp_path / "deploy"
    assert main(deploy_arguments(missing, run_dir, "auto")) == 2
    err = capsys.readouterr().err
    assert f"{RECIPE}: deploy.qat_subnet: the QAT artifact is missing: no file {missing}\n" in err
    assert "`lightning-nas fit` of a QAT recipe (task.name: qat" in err and "run that stage first" in err
    assert not run_dir.exists()  # refused before anything was written
    # a run directory stands for the file in it
    (tmp_path / "qat_finetune" / QAT_SUBNET_FILE).parent.mkdir()
    missing.write_bytes(b"")
    assert find_qat_subnet(str(missing.parent)) == missing
    with pytest.raises(RecipeError, match="deploy.qat_subnet: `lightning-nas deploy` needs the finetuned subnet"):
        find_qat_subnet(None)


def test_a_subnet_finetuned_under_a_mixed_precision_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / QAT_SUBNET_FILE
    torch.save({"space": {}, "config": {}, "output_points": [], "fixed_ranges": {}, "state_dict": {},
                "bits": {"stem.conv": [8, 8], "blocks.0.dw.conv": [4, 6], "head.conv": [None, None]}}, path)
    with pytest.raises(RecipeError, match=r"deploy.qat_subnet: .*uniform 8-bit policy.*1 layer\(s\) other bits, "
                       r"e.g. 'blocks.0.dw.conv' \(4, 6\)"):
        read_record(path)
    torch.save({"model": None}, path)
    with pytest.raises(RecipeError, match="expected a qat_subnet.pt of a QAT run.*no 'space'"):
        read_record(path)


def test_the_target_is_the_one_the_subnet_was_finetuned_for(tmp_path: Path) -> None:
    path = tmp_path / QAT_SUBNET_FILE
    trained = {"target": "x86_vnni/torch"}
    assert deploy_target(DeploySettings(target="x86_vnni/torch"), trained, path).name == "x86_vnni/torch"
    with pytest.raises(RecipeError, match=r"deploy.target: artifacts of different deployment targets .*"
                       r"x86_vnni/torch; expected x86_vnni/onnxruntime.*allow_mixed_targets"):
        deploy_target(DeploySettings(target="x86_vnni/onnxruntime"), trained, path)
    # mixing allowed: another runtime on the same weight grid deploys, another grid never does
    mixed = deploy_target(DeploySettings(target="x86_vnni/onnxruntime", allow_mixed_targets=True), trained, path)
    assert mixed.runtime == "onnxruntime"
    with pytest.raises(RecipeError, match="finetuned for x86_vnni/torch, whose 8-bit weight grid is not x86_avx2"):
        deploy_target(DeploySettings(target="x86_avx2/torch", allow_mixed_targets=True), trained, path)
    # files older than targets record none: nothing to compare with
    assert deploy_target(DeploySettings(target="x86_avx2/torch"), {}, path).name == "x86_avx2/torch"


def test_the_images_are_the_qat_runs_unless_the_recipe_names_its_own(tmp_path: Path) -> None:
    path = tmp_path / QAT_SUBNET_FILE
    with pytest.raises(RecipeError, match="data: no data: section here, and no config.yaml of the QAT run"):
        data_section({"data": None}, path)
    (tmp_path / "config.yaml").write_text("task: {name: qat}\n")
    with pytest.raises(RecipeError, match="the QAT run's config has none either"):
        data_section({}, path)
    (tmp_path / "config.yaml").write_text("data: {name: digits, image_size: 16, holdout_size: 50}\n")
    assert data_section({}, path) == {"name": "digits", "image_size": 16, "holdout_size": 50}
    assert data_section({"data": {"name": "npz", "train_path": "x.npz"}}, path) == {"name": "npz",
                                                                                    "train_path": "x.npz"}
