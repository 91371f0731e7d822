"""QAT finetuning from a tiny supernet trained here on digits, policies, the saved subnet.

The session fixtures of ``conftest.py`` train a narrow, shallow OFA MobileNetV3 supernet (SE and
h-swish stages kept, so every kind of int8 rounding point occurs) for a few epochs, save it as a
Lightning checkpoint the way ``lightning-nas fit`` does, and run one QAT fit per deployment target
from it. Its int8 / ONNX deployment is tested with the deploy stage (tests/stages/test_deploy.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TARGET_NAMES, TINY_SPACE, QATRuns, target_param
from torch import nn

from lightning_nas.deploy.int8 import convert_to_int8, fixed_output_range
from lightning_nas.errors import RecipeError
from lightning_nas.nn.quantize_model import (
    attach_output_quantizers,
    attach_quantizers,
    calibrate_activation_ranges,
    get_bits,
    has_bias_grids,
    output_quantizers,
    remove_quantizers,
)
from lightning_nas.targets import resolve_target
from lightning_nas.tasks.qat import (
    QAT_SUBNET_FILE,
    QATTask,
    int8_rounding_points,
    load_qat_subnet,
)
from lightning_nas.tasks.supernet import SupernetTask, network_record


@pytest.fixture(scope="module")
def checkpoint(tiny_supernet_checkpoint: str, one_thread: None) -> str:
    return tiny_supernet_checkpoint


@pytest.fixture(scope="module", params=[target_param(n) for n in TARGET_NAMES])
def finetuned(request: pytest.FixtureRequest, qat_runs: QATRuns) -> dict:
    """A uniform 8-bit QAT fit trained for the deployment target (``{task, root, metrics}``)."""
    return qat_runs.get(request.param)


def test_finetune_writes_metrics_and_freezes_bn_late(finetuned: dict) -> None:
    metrics = finetuned["metrics"]
    assert metrics["steps"] == 6 and metrics["bn_frozen_at_step"] == 3  # the last half of 6 steps
    assert metrics["test_images"] == 359  # the whole digits test split
    # a trained network: far above chance before and after quantization, and QAT did not break it
    assert metrics["fp32_top1"] > 80 and metrics["initial_top1"] > 80
    assert abs(metrics["test_top1"] - metrics["fp32_top1"]) < 5
    assert metrics["average_bits"] == {"weight": 8.0, "activation": 8.0}
    assert metrics["policy"]["pw_w"] == [8] * 10  # 5 stages x depth 2
    assert (finetuned["root"] / QAT_SUBNET_FILE).is_file() and "deploy" not in metrics  # deployed by its own stage
    frozen = [m for m in finetuned["task"].model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen and all(not m.training for m in frozen)


def test_bias_grids_follow_the_runtime_and_reload(finetuned: dict) -> None:
    task = finetuned["task"]
    trained_with_grids = resolve_target(task.target).runtime == "onnxruntime"
    assert has_bias_grids(task.model) == trained_with_grids
    loaded = load_qat_subnet(finetuned["root"] / QAT_SUBNET_FILE)
    assert has_bias_grids(loaded) == trained_with_grids
    resolution = torch.load(finetuned["root"] / QAT_SUBNET_FILE, map_location="cpu", weights_only=False)["config"]["r"]
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task.model.cpu().eval()(x))


def test_saved_qat_subnet_reloads_with_the_same_outputs(finetuned: dict) -> None:
    task = finetuned["task"]
    reloaded = load_qat_subnet(finetuned["root"] / QAT_SUBNET_FILE)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), task.model.eval()(x))
    assert get_bits(reloaded) == get_bits(task.model)


def test_policy_sets_the_bits_of_each_layer(checkpoint: str) -> None:
    uniform = QATTask(supernet_checkpoint=checkpoint, subnet="smallest", policy=4, deploy=False)
    bits = get_bits(uniform.model)
    assert bits["blocks.0.expand.conv"] == (4, 4) and bits["blocks.0.dw.conv"] == (4, 4)
    assert bits["stem.conv"] == (8, 8) and bits["classifier.linear"] == (8, 8)  # fixed layers
    assert bits["blocks.2.se.reduce"] == (8, 8)  # SE layers stay at the fixed bits
    assert output_quantizers(uniform.model) == {}  # output quantizers only for int8 deployment

    n = uniform.space.num_blocks
    policy = {"pw_w": [6] * n, "pw_a": [8] * n, "dw_w": [4] * n, "dw_a": [6] * n}
    explicit = QATTask(supernet_checkpoint=checkpoint, subnet="smallest", policy=policy, deploy=False)
    bits = get_bits(explicit.model)
    assert bits["blocks.0.expand.conv"] == (6, 8) and bits["blocks.0.project.conv"] == (6, 8)
    assert bits["blocks.0.dw.conv"] == (4, 6)

    first = QATTask(
        supernet_checkpoint=checkpoint, subnet="smallest", policy="random", policy_seed=1, deploy=False
    )
    again = QATTask(
        supernet_checkpoint=checkpoint, subnet="smallest", policy="random", policy_seed=1, deploy=False
    )
    other = QATTask(
        supernet_checkpoint=checkpoint, subnet="smallest", policy="random", policy_seed=2, deploy=False
    )
    assert first.policy == again.policy != other.policy
    assert get_bits(first.model) != get_bits(other.model)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (5, r"uniform bits 5 is not in the allowed set \[4, 6, 8\]"),
        ("randm", r"policy must be a bit width .* or 'random', got 'randm'"),
        (
            {"pw_w": [8, 8], "pw_a": [8, 8], "dw_w": [8, 8], "dw_a": [8, 8]},
            r"key 'pw_w' has 2 entries, expected 10 \(one per block slot\)",
        ),
        ({"pw_w": [8] * 10, "pw_a": [8] * 10, "dw_w": [8] * 10}, r"missing key\(s\) \['dw_a'\]"),
        (
            {"pw_w": [8] * 10, "pw_a": [8] * 10, "dw_w": [8] * 10, "dw_a": [8] * 9 + [3]},
            r"key 'dw_a' index 9: value 3 is not in the allowed set \[4, 6, 8\]",
        ),
    ],
)
def test_invalid_policies_fail_clearly(checkpoint: str, policy: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        QATTask(supernet_checkpoint=checkpoint, subnet="smallest", policy=policy, deploy=False)


def test_deploy_needs_a_uniform_8_bit_policy(checkpoint: str) -> None:
    with pytest.raises(RecipeError, match=r"needs a uniform 8-bit policy .* Set deploy: false"):
        QATTask(supernet_checkpoint=checkpoint, subnet="smallest", policy=6)


def test_exactly_one_source(checkpoint: str, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="exactly one source.*got neither"):
        QATTask(policy=8)
    with pytest.raises(RecipeError, match="exactly one source.*got both"):
        QATTask(supernet_checkpoint=checkpoint, subnet="largest", exported_subnet=checkpoint)
    with pytest.raises(RecipeError, match="supernet_checkpoint needs subnet"):
        QATTask(supernet_checkpoint=checkpoint)
    with pytest.raises(RecipeError, match=r"task.subnet: unknown reference subnet\n  given:   'biggest'\n"
                       r"  allowed: largest, random0"):
        QATTask(supernet_checkpoint=checkpoint, subnet="biggest")
    torch.save({"model": None}, tmp_path / "bad.pt")
    with pytest.raises(RecipeError, match="expected a subnet.pt of `lightning-nas export`.*no 'space'"):
        QATTask(exported_subnet=str(tmp_path / "bad.pt"))


def test_exported_subnet_is_a_source(checkpoint: str, tmp_path: Path) -> None:
    supernet = SupernetTask.from_checkpoint_file(checkpoint, "checkpoint")
    config = supernet.reference_subnets["random0"]
    subnet = supernet.supernet.extract(config)
    torch.save(network_record(subnet, TINY_SPACE, config), tmp_path / "subnet.pt")  # what `lightning-nas export` writes
    task = QATTask(exported_subnet=str(tmp_path / "subnet.pt"), policy=8)
    assert task.config == config
    remove_quantizers(task.model)
    weights = task.model.state_dict()
    for name, tensor in subnet.state_dict().items():
        torch.testing.assert_close(weights[name], tensor)


def test_output_quantizers_calibrate_remove_and_fix_ranges() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.Hardsigmoid()
    ).eval()
    attach_quantizers(model, {"0": (8, 8), "3": (8, 8)})
    gate = fixed_output_range(model[4])
    assert gate == (255 / 256, False)
    attach_output_quantizers(model, ["1", "4"], fixed_ranges={"4": gate})
    x = torch.randn(16, 3, 8, 8)
    ranges = calibrate_activation_ranges(model, [x])
    assert set(ranges) == {"0", "3", "1.output_quantizer"}  # the fixed gate range is not calibrated
    assert ranges["1.output_quantizer"][1] is True  # BN outputs are signed
    assert not model[4].output_quantizer.alpha.requires_grad
    with torch.no_grad():
        gated = model(x)
    torch.testing.assert_close(gated * 256, torch.round(gated * 256))  # the int8 grid of a hard sigmoid
    with pytest.raises(KeyError, match="no module named 'nope'"):
        attach_output_quantizers(model, ["nope"])
    assert set(remove_quantizers(model)) == {"0", "1", "3", "4"}
    assert output_quantizers(model) == {} and not model[1]._forward_hooks


def test_rounding_points_leave_nothing_to_calibration(checkpoint: str) -> None:
    supernet = SupernetTask.from_checkpoint_file(checkpoint, "checkpoint")
    task = QATTask(supernet_checkpoint=checkpoint, subnet="random0", policy=8, fake_quantize_outputs=False)
    model = task.model.eval()
    points, fixed = int8_rounding_points(model)
    assert "classifier.linear" in points and set(fixed) <= set(points)
    assert all(name.endswith("se.gate") for name in fixed)
    batches = [torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate_activation_ranges(model, batches)
    assert convert_to_int8(model, batches, backend="onednn").calibrated_tensors > 0
    attach_output_quantizers(model, points, fixed_ranges=fixed)
    calibrate_activation_ranges(model, batches)
    int8 = convert_to_int8(model, batches, backend="onednn")
    assert int8.calibrated_tensors == 0 and int8.calibrated_output_ranges == []
    assert sorted(int8.carried_output_ranges) == sorted(set(points) - set(fixed))
    with pytest.raises(TypeError, match="MobileNetV3Subnet layout"):
        int8_rounding_points(supernet.supernet)


def test_fbgemm_depthwise_saturates_where_onednn_is_exact() -> None:
    # Why the task converts with onednn: fbgemm's depthwise kernels sum pairs of u8 x s8 products
    # in int16, so large activations times large weights overflow.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)).eval()
    attach_quantizers(model, {"0": (8, 8)})
    x = torch.rand(4, 16, 12, 12) * 4.0
    calibrate_activation_ranges(model, [x], percentile=100)
    with torch.no_grad():
        model[0].parametrizations.weight.original.abs_()
        reference = model(x)
    errors = {}
    for backend in ("fbgemm", "onednn"):
        with torch.no_grad():
            out = convert_to_int8(model, [x], backend=backend)(x)
        errors[backend] = float((out - reference).abs().max() / reference.abs().max())
    assert errors["onednn"] < 0.005 < 0.05 < errors["fbgemm"], errors


def test_a_search_candidate_gives_the_architecture_and_optionally_its_policy(tmp_path: Path) -> None:
    from lightning_nas.tasks.qat import _searched_candidate

    config = {"ks": [3] * 20, "e": [3] * 20, "d": [2] * 5, "r": 24}
    policy = {"pw_w": [4] * 20, "pw_a": [8] * 20, "dw_w": [6] * 20, "dw_a": [8] * 20}
    topk = tmp_path / "topk.json"
    topk.write_text(json.dumps({"topk": [{"rank": 1, "config": config, "policy": policy}]}))
    assert _searched_candidate(str(topk), 0, None, 8) == (config, 8)
    assert _searched_candidate(str(topk), 0, None, "candidate") == (config, policy)
    with pytest.raises(RecipeError, match="out of range: .* has 1 candidates"):
        _searched_candidate(str(topk), 1, None, 8)
    with pytest.raises(RecipeError, match="either subnet or candidate"):
        _searched_candidate(str(topk), 0, "smallest", 8)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RecipeError, match="not a topk.json"):
        _searched_candidate(str(tmp_path / "bad.json"), 0, None, 8)


def test_a_candidate_searched_for_another_target_is_refused(checkpoint: str, tmp_path: Path) -> None:
    from lightning_nas.errors import RecipeError

    host = resolve_target("auto").name
    other = "x86_avx2/torch" if host != "x86_avx2/torch" else "x86_vnni/torch"
    config = {"ks": [3] * 10, "e": [3] * 10, "d": [1] * 5, "r": 16}
    topk = tmp_path / "topk.json"
    topk.write_text(json.dumps({"target": other, "topk": [{"rank": 1, "config": config, "policy": None}]}))
    with pytest.raises(RecipeError, match=rf"task.target: .*candidate {topk}: {other}.*allow_mixed_targets"):
        QATTask(supernet_checkpoint=checkpoint, candidate=str(topk), policy=8, deploy=False)
    task = QATTask(supernet_checkpoint=checkpoint, candidate=str(topk), policy=8, deploy=False, target=other)
    wq = next(m for m in task.model.modules() if m.__class__.__name__ == "WeightQuantizer")
    assert wq.qrange() == ((-63, 63) if resolve_target(other).reduced_weights else (-127, 127))
