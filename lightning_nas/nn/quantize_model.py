"""Attach, re-bit, calibrate and remove fake quantizers on a network, by layer name.

Two kinds of layers are handled by the same calls:

* elastic supernet layers (``lightning_nas.nn.elastic``) expose ``weight_quantizer`` and
  ``input_quantizer`` attributes and apply them themselves to their active weight and input;
* plain ``nn.Conv2d`` / ``nn.Linear`` layers of an extracted subnet get the weight quantizer as a
  ``torch.nn.utils.parametrize`` parametrization of ``weight`` and the input quantizer, stored as
  the submodule ``input_quantizer``, through a forward pre-hook.

Quantizers are created once; attaching again, or :func:`set_bits`, only changes their ``bits``,
so a policy switch during training keeps the learned clipping values and takes effect on the
next forward pass. Layer names are qualified module names, the same names a search space gives
its ``LayerSpec``s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_nas.nn.quant import ActivationQuantizer, WeightQuantizer, check_bits, observed_clip

BitsByLayer = Mapping[str, tuple[int | None, int | None]]

_PLAIN_TYPES = (nn.Conv2d, nn.Linear)


def _is_elastic(module: nn.Module) -> bool:
    return hasattr(module, "weight_quantizer") and hasattr(module, "input_quantizer")


def _quantize_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Module-level function (not a closure) so that deepcopy and pickling of the model keep working.
    return (module.input_quantizer(args[0]), *args[1:])


def _has_input_hook(module: nn.Module) -> bool:
    return any(hook is _quantize_input_hook for hook in module._forward_pre_hooks.values())


def _plain_weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def _get_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"no layer named '{name}' in {type(model).__name__}: {err}") from None
    if not (_is_elastic(module) or isinstance(module, _PLAIN_TYPES)):
        raise TypeError(
            f"layer '{name}' is a {type(module).__name__}; quantizers attach to nn.Conv2d, nn.Linear "
            "or elastic layers with weight_quantizer/input_quantizer attributes"
        )
    return module


def _weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    if _is_elastic(module):
        return module.weight_quantizer
    return _plain_weight_quantizer(module)


def _input_quantizer(module: nn.Module) -> ActivationQuantizer | None:
    q = getattr(module, "input_quantizer", None)
    return q if isinstance(q, ActivationQuantizer) else None


def attach_quantizers(
    model: nn.Module,
    bits_by_layer: BitsByLayer,
    signed: Mapping[str, bool] | None = None,
) -> nn.Module:
    """Give every named layer a weight and an input fake quantizer with the given bits.

    ``bits_by_layer`` maps a layer name to ``(weight_bits, activation_bits)``; ``None`` or 32 is
    full precision. A layer that already has quantizers only has its bits changed. ``signed``
    optionally fixes the sign of a layer's input quantizer; otherwise it is decided from data (see
    :func:`calibrate_activation_ranges`). Layers not named are left as they are. Returns ``model``.
    """
    signed = signed or {}
    # Check every entry before changing anything, so a bad policy leaves the model untouched.
    resolved = []
    for name, (w_bits, a_bits) in bits_by_layer.items():
        resolved.append((name, _get_layer(model, name), check_bits(w_bits), check_bits(a_bits)))
    for name, module, w_bits, a_bits in resolved:
        wq = _weight_quantizer(module)
        if wq is None:
            wq = WeightQuantizer(w_bits)
            if _is_elastic(module):
                module.weight_quantizer = wq
            else:
                # unsafe=False checks the parametrization keeps the weight's shape and dtype.
                parametrize.register_parametrization(module, "weight", wq)
        else:
            wq.bits = w_bits
        aq = _input_quantizer(module)
        if aq is None:
            aq = ActivationQuantizer(a_bits, signed=signed.get(name))
            reference = next(module.parameters(), None)
            if reference is not None:
                aq = aq.to(device=reference.device)
            module.input_quantizer = aq
            if not _is_elastic(module) and not _has_input_hook(module):
                module.register_forward_pre_hook(_quantize_input_hook)
        else:
            aq.bits = a_bits
            if name in signed:
                aq.signed = bool(signed[name])
    return model


def set_bits(model: nn.Module, bits_by_layer: BitsByLayer) -> None:
    """Change the bits of quantizers already attached; unlike :func:`attach_quantizers` this
    never creates one, so a layer without quantizers is an error."""
    resolved = []
    for name, (w_bits, a_bits) in bits_by_layer.items():
        module = _get_layer(model, name)
        wq, aq = _weight_quantizer(module), _input_quantizer(module)
        if wq is None or aq is None:
            raise KeyError(f"layer '{name}' has no quantizers; call attach_quantizers first")
        resolved.append((wq, aq, check_bits(w_bits), check_bits(a_bits)))
    for wq, aq, w_bits, a_bits in resolved:
        wq.bits = w_bits
        aq.bits = a_bits


def quantized_layers(model: nn.Module) -> dict[str, tuple[WeightQuantizer, ActivationQuantizer]]:
    """Layers that carry quantizers, by qualified name, with their (weight, input) quantizers."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            continue
        wq, aq = _weight_quantizer(module), _input_quantizer(module)
        if wq is not None and aq is not None:
            out[name] = (wq, aq)
    return out


def get_bits(model: nn.Module) -> dict[str, tuple[int | None, int | None]]:
    """The bits actually in use, by layer name (the inverse of :func:`set_bits`)."""
    return {name: (wq.bits, aq.bits) for name, (wq, aq) in quantized_layers(model).items()}


def remove_quantizers(model: nn.Module) -> list[str]:
    """Take every quantizer off, restoring the float weights; returns the layers touched."""
    touched = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            continue
        changed = False
        if _is_elastic(module):
            if module.weight_quantizer is not None or module.input_quantizer is not None:
                module.weight_quantizer = None
                module.input_quantizer = None
                changed = True
        else:
            if _plain_weight_quantizer(module) is not None:
                # A deepcopy shares the injected "Parametrized*" class with its source, and removal
                # deletes the property from that class; a private clone keeps the source intact.
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                # leave_parametrized=False restores the float weight the quantizer was fed with.
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                changed = True
            hooks = [k for k, hook in module._forward_pre_hooks.items() if hook is _quantize_input_hook]
            for key in hooks:
                del module._forward_pre_hooks[key]
            if isinstance(getattr(module, "input_quantizer", None), ActivationQuantizer):
                del module.input_quantizer
                changed = True
            changed = changed or bool(hooks)
        if changed:
            touched.append(name)
    return touched


def _batch_input(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in batch:
                return batch[key]
        raise KeyError(f"cannot find the input in a batch with keys {sorted(batch)}")
    return batch


@torch.no_grad()
def calibrate_activation_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    percentile: float = 99.99,
    max_batches: int | None = None,
) -> dict[str, tuple[float, bool]]:
    """Initialise every input quantizer's clipping value from observed statistics.

    The model runs in eval mode with all quantization switched off (statistics of the float
    network), each quantizer recording the ``percentile`` of its input magnitudes per batch
    (``percentile=100``: the maximum); the clipping value is the mean over batches and the sign
    is "signed" when any negative input was seen. Under an initialised ``torch.distributed``
    group the statistics are averaged (and the sign OR-ed) over ranks, so every rank ends up
    with the same ranges. A batch is a tensor, a ``(input, target, ...)`` sequence or a dict.

    Returns ``{layer name: (alpha, signed)}``.
    """
    layers = quantized_layers(model)
    saved = {name: (wq.bits, aq.bits) for name, (wq, aq) in layers.items()}
    stats: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in layers}  # clip sum, count, min

    def observe(name: str, quantizer: ActivationQuantizer):  # noqa: ANN202 - hook factory
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            entry = stats[name]
            entry[2] = min(entry[2], float(x.min()))
            signed = quantizer.signed if quantizer.signed is not None else entry[2] < 0
            entry[0] += observed_clip(x, signed, percentile)
            entry[1] += 1

        return hook

    handles = [aq.register_forward_pre_hook(observe(name, aq)) for name, (_, aq) in layers.items()]
    # Per-module flags: model.train(flag) afterwards would also undo deliberate per-module modes.
    modes = {module: module.training for module in model.modules()}
    device = next((p.device for p in model.parameters()), None)
    try:
        for wq, aq in layers.values():
            wq.bits = None
            aq.bits = None
        model.eval()
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = _batch_input(batch)
            if isinstance(x, torch.Tensor) and device is not None:
                x = x.to(device)
            model(x)
    finally:
        for h in handles:
            h.remove()
        for name, (wq, aq) in layers.items():
            wq.bits, aq.bits = saved[name]
        for module, mode in modes.items():
            module.training = mode

    # Every layer is reduced, seen or not, so that all ranks pass tensors of the same shape.
    names = list(layers)
    values = torch.tensor(
        [[stats[n][0], stats[n][1], -min(stats[n][2], 0.0)] for n in names], dtype=torch.float64
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized() and names:
        if device is not None and device.type != "cpu":  # NCCL reduces device tensors only
            values = values.to(device)
        sums = values[:, :2].clone()
        neg = values[:, 2:].clone()
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(neg, op=torch.distributed.ReduceOp.MAX)
        values = torch.cat([sums, neg], dim=1)

    result: dict[str, tuple[float, bool]] = {}
    for row, name in zip(values.tolist(), names):
        clip_sum, count, negative = row
        if count == 0:  # the layer is outside the active subnet: keep its current range
            continue
        _, aq = layers[name]
        signed = aq.signed if aq.signed is not None else negative > 0
        aq.set_range(clip_sum / count, signed)
        result[name] = (float(aq.alpha), bool(aq.signed))
    return result


def _force_eval_hook(module: nn.Module, _args: tuple[Any, ...]) -> None:
    # Runs before every forward, so the frozen state survives the trainer's model.train() calls.
    module.train(False)


def _is_batchnorm(module: nn.Module) -> bool:
    # Elastic BN wrappers are matched by name: they may hold the real BN as a child.
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


def freeze_batchnorm(model: nn.Module, frozen: bool = True) -> int:
    """Put every batch-norm layer in eval mode for good (late QAT), or undo it.

    Frozen layers normalise with their running statistics and stop updating them, even when the
    model is later switched to training mode; their affine parameters keep training. Returns the
    number of batch-norm layers changed.
    """
    count = 0
    for module in model.modules():
        if not _is_batchnorm(module):
            continue
        hooks = [k for k, hook in module._forward_pre_hooks.items() if hook is _force_eval_hook]
        if frozen and not hooks:
            module.register_forward_pre_hook(_force_eval_hook)
            module.train(False)
            count += 1
        elif not frozen and hooks:
            for key in hooks:
                del module._forward_pre_hooks[key]
            module.train(model.training)
            count += 1
    return count
