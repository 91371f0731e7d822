from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nas.deploy import (
    compare_fp32_int8,
    convert_to_int8,
    export_onnx,
    measure_latency,
    onnx_session,
    run_onnx,
    top1_agreement,
)
from lightning_nas.nn.quantize_model import (
    attach_bias_grids,
    attach_quantizers,
    calibrate_activation_ranges,
    quantized_layers,
    remove_quantizers,
    set_bits,
)
from lightning_nas.nn.threads import torch_threads
from lightning_nas.targets import host_can_run, resolve_target


class Block(nn.Module):
    """MobileNetV3-style block: expand, depthwise, squeeze-excite (Tensor.mean, as OFA), project, residual."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, expanded, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expanded)
        self.act1 = nn.Hardswish()
        self.dw = nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False)
        self.bn2 = nn.BatchNorm2d(expanded)
        self.act2 = nn.ReLU()
        self.se_reduce = nn.Conv2d(expanded, expanded // 4, 1)
        self.se_act = nn.ReLU()
        self.se_expand = nn.Conv2d(expanded // 4, expanded, 1)
        self.gate = nn.Hardsigmoid()
        self.project = nn.Conv2d(expanded, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
        pooled = y.mean(3, keepdim=True).mean(2, keepdim=True)
        y = y * self.gate(self.se_expand(self.se_act(self.se_reduce(pooled))))
        return x + self.bn3(self.project(y))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.Hardswish()
        self.blocks = nn.Sequential(Block(16, 48), Block(16, 64))
        self.head = nn.Conv2d(16, 64, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(64)
        self.head_act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_act(self.head_bn(self.head(self.blocks(self.act(self.bn(self.stem(x)))))))
        return self.classifier(torch.flatten(self.pool(x), 1))


LAYERS = [
    "stem",
    *(f"blocks.{i}.{n}" for i in range(2) for n in ("expand", "dw", "se_reduce", "se_expand", "project")),
    "head",
    "classifier",
]


def _synthetic_images(
    n: int, generator: torch.Generator, templates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of smooth per-class templates: a task a tiny net learns in a few dozen steps,
    so that predictions spread over the classes with realistic margins (a random net predicts one
    class everywhere and makes agreement trivial)."""
    labels = torch.randint(0, templates.shape[0], (n,), generator=generator)
    return templates[labels] + 1.5 * torch.randn(n, *templates.shape[1:], generator=generator), labels


def _train(model: nn.Module, steps: int, lr: float, data) -> list[float]:  # noqa: ANN001
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = data(32)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return losses


def _target_param(name: str):  # noqa: ANN202 - a pytest param
    reason = f"this host ({resolve_target('auto').isa}) does not compute {name}'s int8 arithmetic natively"
    return pytest.param(name, marks=pytest.mark.skipif(not host_can_run(name), reason=reason), id=name)


#: Torch targets; the host's own always runs (a VNNI host also computes the AVX2 grid exactly).
TORCH_TARGETS = [_target_param(name) for name in ("x86_vnni/torch", "x86_avx2/torch", "arm/torch")]


@pytest.fixture(scope="module", params=TORCH_TARGETS)
def setup(request: pytest.FixtureRequest) -> Iterator[dict]:
    target = resolve_target(request.param)
    # One thread: on a shared 2-core machine two OpenMP threads thrash (15x slower steps).
    with torch_threads(1):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        templates = nn.functional.interpolate(
            torch.randn(10, 3, 4, 4, generator=generator), size=16, mode="bilinear"
        )

        def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return _synthetic_images(n, generator, templates)

        # The pipeline in miniature: a float model, then quantizers, calibration and a short QAT.
        model = TinyNet()
        float_losses = _train(model, 80, 3e-3, data)
        attach_quantizers(model, {name: (8, 8) for name in LAYERS}, reduce_weight_range=target.reduced_weights)
        calibrate_activation_ranges(model, [data(200)])
        alphas = {name: float(aq.alpha) for name, (_, aq) in quantized_layers(model).items()}
        qat_losses = _train(model, 10, 5e-4, data)
        images, labels = data(1000)
        calibration = [data(100)[0] for _ in range(3)]
        int8 = convert_to_int8(model, calibration, target=target)
        with torch.no_grad():
            fake = model(images)
            real = int8(images)
        yield {
            "target": target,
            "model": model,
            "int8": int8,
            "images": images,
            "labels": labels,
            "fake": fake,
            "real": real,
            "float_losses": float_losses,
            "qat_losses": qat_losses,
            "alphas": alphas,
        }


def test_training_and_qat_learn(setup: dict) -> None:
    losses = setup["float_losses"]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    accuracy = float((setup["fake"].argmax(1) == setup["labels"]).float().mean())
    assert accuracy > 0.7, accuracy
    assert setup["fake"].argmax(1).unique().numel() == 10  # agreement below is not trivial
    # QAT moved the learned clipping values away from their calibrated start
    moved = {
        n for n, (_, aq) in quantized_layers(setup["model"]).items() if float(aq.alpha) != setup["alphas"][n]
    }
    assert moved == set(LAYERS)


def test_int8_agrees_with_fake_quantized_model(setup: dict) -> None:
    int8 = setup["int8"]
    assert sorted(int8.carried_ranges) == sorted(LAYERS) and int8.calibrated_ranges == []
    assert int8.engine == setup["target"].engine
    codes = [m.weight().int_repr() for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert max(int(c.abs().max()) for c in codes) == setup["target"].weight_qmax
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.modules())
    agreement = top1_agreement(setup["fake"], setup["real"])
    assert agreement >= 99.0, agreement
    rel = float((setup["fake"] - setup["real"]).norm() / setup["fake"].norm())
    assert rel < 0.03, rel


def test_top1_agreement_is_the_percent_of_rows_predicting_the_same_class() -> None:
    first = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    second = np.array([[9.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [0.0, 1.0, 5.0]])  # row 1 differs
    assert top1_agreement(first, second) == pytest.approx(75.0)
    assert top1_agreement(second, first) == pytest.approx(75.0)
    assert top1_agreement(first, first.numpy()) == 100.0
    with pytest.raises(ValueError, match="disagree in shape"):
        top1_agreement(first, second[:3])


def test_int8_weights_are_the_training_grid() -> None:
    # FX folds BN into the conv, rescaling each output channel (negative gammas flip it): the
    # deployed integers must still be the ones training used.
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.5, 2)
        # Weights on exact half steps of their channel's grid (the largest at 127 steps): training
        # rounds each tie to even, while FX rounds w * gamma / sigma on the folded grid, where
        # float error decides the tie; the conversion must carry the training integers over.
        for conv in (model[0], model[3]):
            halves = torch.randint(-120, 120, conv.weight.shape).float() + 0.5
            halves.reshape(len(halves), -1)[:, 0] = 127.0
            conv.weight.copy_(halves * torch.rand(len(halves)).add(0.01).reshape(-1, 1, 1, 1) / 50)
    model.eval()
    attach_quantizers(model, {"0": (8, 8), "3": (8, 8)})
    batches = [torch.randn(8, 3, 8, 8)]
    calibrate_activation_ranges(model, batches)
    int8 = convert_to_int8(model, batches)
    assert int8.replaced_weight_codes > 0
    for conv, bn in (("0", model[1]), ("3", model[4])):
        layer = model.get_submodule(conv)
        w = layer.parametrizations.weight.original.detach()
        train_ints = layer.parametrizations.weight[0].codes(w)
        assert torch.equal(layer.weight.detach(), train_ints * layer.parametrizations.weight[0].scale(w))
        sign = torch.sign(bn.weight.detach()).reshape(-1, 1, 1, 1)
        deployed = int8.get_submodule(conv).weight().int_repr().float()
        assert torch.equal(deployed, train_ints * sign)


def test_onnx_qdq_export_runs_in_onnxruntime(setup: dict, tmp_path: Path) -> None:
    import onnx

    path = export_onnx(setup["int8"], setup["images"][:1], tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    session = onnx_session(path, threads=1)
    logits = run_onnx(session, setup["images"])  # dynamic batch: 1000 at once
    assert logits.shape == (1000, 10)
    assert top1_agreement(logits, setup["real"]) >= 99.0
    assert top1_agreement(logits, setup["fake"]) >= 99.0


def test_non_uniform_policy_is_rejected(setup: dict) -> None:
    model = copy.deepcopy(setup["model"])
    set_bits(model, {"blocks.1.dw": (4, 8)})
    with pytest.raises(
        ValueError,
        match=r"uniform 8-bit policy; layer 'blocks.1.dw' uses \(weight, activation\) bits \(4, 8\)",
    ):
        convert_to_int8(model, [setup["images"][:10]])


def test_plain_model_post_training_quantization(setup: dict) -> None:
    model = copy.deepcopy(setup["model"])
    remove_quantizers(model)
    int8 = convert_to_int8(model, [setup["images"][:200]])
    assert int8.carried_ranges == []
    with torch.no_grad():
        assert top1_agreement(model(setup["images"][:200]), int8(setup["images"][:200])) >= 95.0


def test_latency_report_is_json(setup: dict, tmp_path: Path) -> None:
    stats = measure_latency(setup["int8"], setup["images"][:1], warmup=1, repeats=3, threads=1)
    assert {"median_ms", "mean_ms", "std_ms", "p90_ms"} <= set(stats) and stats["median_ms"] > 0
    float_model = copy.deepcopy(setup["model"])
    remove_quantizers(float_model)
    onnx_path = export_onnx(setup["int8"], setup["images"][:1], tmp_path / "m.onnx")
    onnx_fp32 = export_onnx(float_model, setup["images"][:1], tmp_path / "fp32.onnx")
    report = compare_fp32_int8(
        float_model, setup["int8"], (3, 16, 16), onnx_path=onnx_path, onnx_fp32_path=onnx_fp32, warmup=1,
        repeats=3, target=setup["target"].name,
    )
    json.loads(json.dumps(report))
    # fp32 and int8 compared within each runtime, never across
    assert set(report["results"]) == {"torch_fp32", "torch_int8", "onnxruntime_fp32", "onnxruntime_int8"}
    assert set(report["results"]["torch_int8"]) == {"batch_1", "batch_32"}
    assert report["speedup_torch_int8"]["batch_32"] > 0 and report["speedup_onnxruntime_int8"]["batch_1"] > 0
    assert report["target"] == setup["target"].name
    assert report["device"]["isa"] == resolve_target("auto").isa


_SATURATION_SCRIPT = """
import torch
from torch.ao.nn.quantized import Conv2d
torch.backends.quantized.engine = "onednn"
torch.manual_seed(0)
errors = []
for qmax in (127, 63):
    conv = Conv2d(64, 32, 3, padding=1, bias=False)
    w = torch.randint(-qmax, qmax + 1, (32, 64, 3, 3)).float()
    w[:, :, 0, :2] = qmax  # pairs of large products
    qw = torch._make_per_channel_quantized_tensor(
        w.to(torch.int8), torch.full((32,), 0.01, dtype=torch.double), torch.zeros(32, dtype=torch.long), 0)
    conv.set_weight_bias(qw, None)
    x = torch.randint(0, 256, (2, 64, 10, 10)).float()
    x[:, :, ::2, ::2] = 255
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1) * 0.02 * 0.01
    conv.scale, conv.zero_point = float(exact.abs().max() / 127), 128
    out = conv(torch.quantize_per_tensor(x * 0.02, 0.02, 0, torch.quint8)).dequantize().double()
    errors.append(float(((out - exact).abs() / conv.scale).max()))
print(errors[0], errors[1])
"""


@pytest.mark.skipif(resolve_target("auto").isa == "arm", reason="oneDNN's x86 ISA limit needs an x86 host")
def test_avx2_kernels_saturate_8_bit_weights_and_not_7_bit_ones() -> None:
    # Why x86_avx2 targets train 7-bit weights: oneDNN limited to AVX2 (as on a CPU without VNNI)
    # adds pairs of u8 x s8 products into a saturating int16. Holds on either x86 kind.
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SATURATION_SCRIPT], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    full, reduced = map(float, out.stdout.split())
    assert full > 10 and reduced <= 0.5 + 1e-6, (full, reduced)


def _onnx_constant(model: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = next(n for n in model.graph.node if name in n.output)
    if node.op_type == "Identity":
        return _onnx_constant(model, node.input[0])
    assert node.op_type == "Constant"
    return numpy_helper.to_array(node.attribute[0].t)


def test_onnx_export_rounds_int32_bias_codes(tmp_path: Path) -> None:
    """torch's exporter casts ``bias / (s_in * s_w)`` to int32, truncating; the export rounds."""
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 5)).eval()
    with torch.no_grad():
        model[0].bias.uniform_(-0.5, 0.5)
    images = torch.randn(64, 3, 6, 6)
    int8 = convert_to_int8(model, [images])
    exported = onnx.load(str(export_onnx(int8, images[:1], tmp_path / "m.onnx")))
    producer = {out: node for node in exported.graph.node for out in node.output}
    checked, truncation_differs = 0, 0
    for name, node in zip(("0", "3"), [n for n in exported.graph.node if n.op_type in ("Conv", "Gemm")]):
        dequantize = producer[node.input[2]]
        codes = _onnx_constant(exported, dequantize.input[0])
        scale = _onnx_constant(exported, dequantize.input[1]).astype(np.float64)
        layer = int8.get_submodule(name)
        # the bias grid is s_in * s_w per output channel
        input_scale = float(_onnx_constant(exported, producer[node.input[0]].input[1]))
        np.testing.assert_allclose(scale, input_scale * layer.weight().q_per_channel_scales().double().numpy(), rtol=1e-6)
        exact = layer.bias().detach().double().numpy() / scale
        np.testing.assert_array_equal(codes, np.round(exact))
        truncation_differs += int((np.trunc(exact) != np.round(exact)).sum())
        checked += 1
    assert checked == 2 and truncation_differs > 0
    session = onnx_session(tmp_path / "m.onnx", threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(session, images), int8(images).numpy(), atol=0.05)


def test_bias_grids_reach_torch_and_onnx_biases(tmp_path: Path) -> None:
    """A model trained with int32 bias grids (ONNX Runtime targets) deploys those biases exactly."""
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[4].bias.uniform_(-0.5, 0.5)
    attach_quantizers(model, {"0": (8, 8), "4": (8, 8)})
    images = torch.randn(64, 3, 6, 6)
    calibrate_activation_ranges(model.eval(), [images])
    assert attach_bias_grids(model) == ["1", "4"]
    int8 = convert_to_int8(model, [images], target="x86_vnni/onnxruntime")
    exported = onnx.load(str(export_onnx(int8, images[:1], tmp_path / "m.onnx")))
    producer = {out: node for node in exported.graph.node for out in node.output}
    for name, node in zip(("0", "4"), [n for n in exported.graph.node if n.op_type in ("Conv", "Gemm")]):
        layer = int8.get_submodule(name)
        step = model.get_submodule(name).input_quantizer.scale().detach().double() * layer.weight().q_per_channel_scales().double()
        in_steps = layer.bias().detach().double() / step
        # float32 holds a code near 4e4 to about 0.003 step
        torch.testing.assert_close(in_steps, in_steps.round(), atol=0.01, rtol=0)  # torch adds the grid bias
        dequantize = producer[node.input[2]]
        codes = _onnx_constant(exported, dequantize.input[0])
        np.testing.assert_array_equal(codes, in_steps.round().numpy())  # and ONNX Runtime the same codes
    with torch.no_grad():
        fake, real = model(images), int8(images)
    onnx_logits = run_onnx(onnx_session(tmp_path / "m.onnx", threads=1), images)
    np.testing.assert_allclose(onnx_logits, real.numpy(), atol=0.05)
    assert top1_agreement(real, fake) >= 95.0


def test_conversion_adds_the_bias_codes_training_added_even_on_a_rounding_boundary(tmp_path: Path) -> None:
    """Float biases that sit on a code boundary (where training with the grid can leave them): the
    conversion folds batch norm in another order, and rounding its float bias would pick the other
    code in some channels; the int8 model and the ONNX export add the codes training added."""
    import onnx

    from lightning_nas.nn.quantize_model import bias_grid_codes

    torch.manual_seed(0)
    channels = 512
    model = nn.Sequential(nn.Conv2d(4, channels, 1, bias=False), nn.BatchNorm2d(channels))
    images = torch.randn(64, 4, 3, 3)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-3.0, 3.0)
        model[1].running_var.uniform_(0.5, 2.0)
    attach_quantizers(model, {"0": (8, 8)}, reduce_weight_range=True)
    calibrate_activation_ranges(model.eval(), [images])
    attach_bias_grids(model)
    conv, bn = model[0], model[1]
    with torch.no_grad():  # folded bias exactly half-way between codes 1000 + c and 1001 + c
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        wq = conv.parametrizations.weight[0]
        step = conv.input_quantizer.scale() * wq.scale(conv.parametrizations.weight.original).flatten() * gain
        bn.bias.copy_((1000.5 + torch.arange(channels)) * step + bn.running_mean * gain)
    trained = bias_grid_codes(model)["0"]
    int8 = convert_to_int8(model, [images], target="x86_avx2/onnxruntime")
    layer = int8.get_submodule("0")
    int8_step = float(conv.input_quantizer.scale()) * layer.weight().q_per_channel_scales().double()
    # what rounding the conversion's own folded bias gives (quantizers and hooks off, same folding)
    plain = copy.deepcopy(model)
    remove_quantizers(plain)
    from torch.nn.utils.fusion import fuse_conv_bn_eval  # what FX's conv-BN fusion calls in eval mode

    refolded = (fuse_conv_bn_eval(plain[0], plain[1]).bias.detach().double() / int8_step).round()
    assert int((refolded != trained).sum()) > 0  # the boundary cases exist: rounding again flips codes
    torch.testing.assert_close(layer.bias().detach().double() / int8_step, trained, atol=1e-3, rtol=0)
    exported = onnx.load(str(export_onnx(int8, images[:1], tmp_path / "m.onnx")))
    producer = {out: node for node in exported.graph.node for out in node.output}
    node = next(n for n in exported.graph.node if n.op_type == "Conv")
    codes = _onnx_constant(exported, producer[node.input[2]].input[0])
    np.testing.assert_array_equal(codes, trained.numpy())
