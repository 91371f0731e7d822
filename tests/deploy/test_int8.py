from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

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
    attach_quantizers,
    calibrate_activation_ranges,
    quantized_layers,
    remove_quantizers,
    set_bits,
)


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


@pytest.fixture(scope="module")
def setup() -> Iterator[dict]:
    # One thread: on a shared 2-core machine two OpenMP threads thrash (15x slower steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
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
        attach_quantizers(model, {name: (8, 8) for name in LAYERS})
        calibrate_activation_ranges(model, [data(200)])
        alphas = {name: float(aq.alpha) for name, (_, aq) in quantized_layers(model).items()}
        qat_losses = _train(model, 10, 5e-4, data)
        images, labels = data(1000)
        calibration = [data(100)[0] for _ in range(3)]
        int8 = convert_to_int8(model, calibration)
        with torch.no_grad():
            fake = model(images)
            real = int8(images)
        yield {
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
    finally:
        torch.set_num_threads(threads)


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
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.modules())
    agreement = top1_agreement(setup["fake"], setup["real"])
    assert agreement >= 0.99, agreement
    rel = float((setup["fake"] - setup["real"]).norm() / setup["fake"].norm())
    assert rel < 0.03, rel


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
    assert top1_agreement(logits, setup["real"]) >= 0.99
    assert top1_agreement(logits, setup["fake"]) >= 0.99


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
        assert top1_agreement(model(setup["images"][:200]), int8(setup["images"][:200])) >= 0.95


def test_latency_report_is_json(setup: dict, tmp_path: Path) -> None:
    stats = measure_latency(setup["int8"], setup["images"][:1], warmup=1, repeats=3, threads=1)
    assert {"median_ms", "mean_ms", "std_ms", "p90_ms"} <= set(stats) and stats["median_ms"] > 0
    float_model = copy.deepcopy(setup["model"])
    remove_quantizers(float_model)
    onnx_path = export_onnx(setup["int8"], setup["images"][:1], tmp_path / "m.onnx")
    report = compare_fp32_int8(
        float_model, setup["int8"], (3, 16, 16), onnx_path=onnx_path, warmup=1, repeats=3
    )
    json.dumps(report)
    assert set(report["results"]) == {"fp32", "int8", "onnx_int8"}
    assert set(report["results"]["int8"]) == {"batch_1", "batch_32"}
    assert report["speedup_int8"]["batch_32"] > 0
