from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nas.nn.evaluation import evaluate
from lightning_nas.nn.ptq import PTQEvaluator, adaround, clipped_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_ptq_writes_the_clipped_weights_reestimates_bn_and_leaves_the_model_alone() -> None:
    model = small_net().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    bn = list(data(32, 0)[0].split(16))
    tests = [data(24, 1)]
    evaluator = PTQEvaluator(model, ["3"], ["0", "8"], bn, tests)
    top1, loss = evaluator.evaluate([2])
    assert 0.0 <= top1 <= 100.0 and loss > 0
    quantized = evaluator.model
    torch.testing.assert_close(quantized[3].weight, clipped_quantize(model[3].weight, 2)[0])
    torch.testing.assert_close(quantized[0].weight, clipped_quantize(model[0].weight, 8)[0])
    # BN statistics are those of the quantized network on the calibration images
    inputs = []
    handle = quantized[4].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        quantized.train()
        for b in bn:
            quantized(b)
        quantized.eval()
    handle.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(quantized[4].running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    # repeatable, and other bits give other weights
    assert evaluator.evaluate([2]) == (top1, loss)
    evaluator.evaluate([4])
    torch.testing.assert_close(quantized[3].weight, clipped_quantize(model[3].weight, 4)[0])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key])
    with pytest.raises(ValueError, match="1 bit widths"):
        evaluator.evaluate([2, 3])


def test_8_bit_ptq_stays_close_to_the_float_network() -> None:
    model = small_net().eval()
    tests = [data(64, 1)]
    bn = list(data(64, 0)[0].split(32))
    # the float network's own BN statistics come from the same images, so only quantization differs
    from lightning_nas.nn.bn_recalibration import recalibrate_batchnorm

    recalibrate_batchnorm(model, bn)
    _, float_loss = evaluate(model, tests)
    _, loss = PTQEvaluator(model, ["3"], ["0", "8"], bn, tests).evaluate([8])
    assert loss == pytest.approx(float_loss, rel=0.02)


@pytest.mark.parametrize("bits", [2, 3])
def test_learned_rounding_reconstructs_the_output_better_than_nearest(bits: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    inputs = torch.relu(torch.randn(64, 8, 6, 6))
    nearest, ratio = clipped_quantize(conv.weight, bits)
    learned = adaround(conv, conv.weight, bits, ratio, inputs, steps=300, lr=1e-2)
    with torch.no_grad():
        target = conv(inputs)
        error_nearest = (nn.functional.conv2d(inputs, nearest, padding=1) - target).square().sum()
        error_learned = (nn.functional.conv2d(inputs, learned, padding=1) - target).square().sum()
    assert error_learned < 0.9 * error_nearest
    qmax = 2 ** (bits - 1) - 1
    scale = (conv.weight.detach().reshape(6, -1).abs().amax(1) * ratio / qmax).reshape(6, 1, 1, 1)
    codes = learned / scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    w = conv.weight.detach() / scale
    inside = (w > -qmax) & (w < qmax)  # away from the clipped ends, codes are floor or ceil of w / scale
    assert ((codes.round() - torch.floor(w)).abs() <= 1)[inside].all()
    assert ((codes.round() == torch.floor(w)) | (codes.round() == torch.floor(w) + 1))[inside].all()


def test_ptq_with_rounding_steps_uses_learned_rounding() -> None:
    model = small_net().eval()
    bn = list(data(32, 0)[0].split(16))
    evaluator = PTQEvaluator(model, ["3"], ["0", "8"], bn, [data(24, 1)], rounding_steps=30, rounding_images=16)
    assert evaluator._layer_inputs["3"].shape == (16, 8, 8, 8)
    evaluator.evaluate([2])
    learned = evaluator.model[3].weight
    assert not torch.allclose(learned, clipped_quantize(model[3].weight, 2)[0])


def test_ptq_of_an_ofa_subnet_quantizes_depthwise_and_se_per_channel() -> None:
    from conftest import tiny_ofa_subnet

    from lightning_nas.nn.bn_recalibration import recalibrate_batchnorm

    model = tiny_ofa_subnet()
    layers = model.block_layers()
    fixed = ["stem.conv", "head.final_expand.conv", "head.feature_mix.conv", "classifier.linear"]
    g = torch.Generator().manual_seed(0)
    bn = list(torch.randn(64, 3, 16, 16, generator=g).split(32))
    tests = [(torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g))]
    # the float network's own BN statistics come from the calibration images, as in an exported subnet
    recalibrate_batchnorm(model, bn)
    evaluator = PTQEvaluator(model, layers, fixed, bn, tests)
    top1, loss = evaluator.evaluate([2] * len(layers))
    assert 0.0 <= top1 <= 100.0 and torch.isfinite(torch.tensor(loss))
    quantized = evaluator.model
    for name in ("first_block.dw.conv", "blocks.6.dw.conv", "blocks.6.se.reduce", "blocks.6.se.expand"):
        weight, original = quantized.get_submodule(name).weight, model.get_submodule(name).weight
        torch.testing.assert_close(weight, clipped_quantize(original, 2)[0])
        # 2 bits: every output channel (one per depthwise channel) on its own ternary grid
        for channel in weight.detach().reshape(weight.shape[0], -1):
            assert len(torch.unique(channel)) <= 3
    # the SE convs' biases and the batch norms after depthwise convs: biases untouched, BN re-estimated
    torch.testing.assert_close(quantized.get_submodule("blocks.6.se.reduce").bias,
                               model.get_submodule("blocks.6.se.reduce").bias)
    assert not torch.allclose(quantized.get_submodule("blocks.6.dw.bn").running_var,
                              model.get_submodule("blocks.6.dw.bn").running_var)
    # activation grids: unsigned after ReLU, signed after h-swish (it dips to -0.375) and on the
    # linear outputs a project conv reads (rescaled by the SE gate in blocks 6 and 8)
    signed = {n: quantized.get_submodule(n).input_quantizer.signed for n in layers}
    assert not signed["blocks.2.dw.conv"] and not signed["blocks.2.se.expand"]  # ReLU stage
    assert signed["blocks.6.dw.conv"] and signed["blocks.6.project.conv"] and signed["blocks.8.expand.conv"]
    # fewer bits, larger error: the logits of the same images against the float network's
    images = tests[0][0]
    with torch.no_grad():
        float_logits = model(images)
        errors = []
        for bits in (8, 4, 2):
            evaluator.evaluate([bits] * len(layers))
            errors.append(float((quantized(images) - float_logits).norm()))
    assert errors[0] < errors[1] < errors[2]
