"""Attach, re-bit, calibrate and remove fake quantizers on a network, by layer name.

Two kinds of layers are handled by the same calls:

* elastic supernet layers (``lightning_nas.nn.elastic``) expose ``weight_quantizer`` and
  ``input_quantizer`` attributes and apply them themselves to their active weight and input;
* plain ``nn.Conv2d`` / ``nn.Linear`` layers of an extracted subnet get the weight quantizer as a
  ``torch.nn.utils.parametrize`` parametrization of ``weight`` and the input quantizer, stored as
  the submodule ``input_quantizer``, through a forward pre-hook.

Opt-in, :func:`attach_output_quantizers` also fake-quantizes the *output* of named modules of any
type (a batch norm before h-swish, a residual block, the logits): tensors that real int8 kernels
round but that input quantizers never see. Training a network with them makes its fake-quantized
forward pass match the int8 model converted by :func:`lightning_nas.deploy.int8.convert_to_int8`,
which carries their learned ranges over.

Quantizers are created once; attaching again, or :func:`set_bits`, only changes their ``bits``,
so a policy switch during training keeps the learned clipping values and takes effect on the
next forward pass. Layer names are qualified module names, the same names a search space gives
its ``LayerSpec``s.

Why one module of about 540 lines: attaching, re-biting, calibrating, bias grids and removal act
on the same hooks and quantizer attributes, and each must undo or find what the others attach.
"""

from __future__ import annotations

import copy
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


def _quantize_output_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    # Module-level for the same reason as the input hook.
    return module.output_quantizer(output)


def _output_hooks(module: nn.Module) -> list[int]:
    return [k for k, hook in module._forward_hooks.items() if hook is _quantize_output_hook]


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
    reduce_weight_range: bool | None = None,
) -> nn.Module:
    """Give every named layer a weight and an input fake quantizer with the given bits.

    ``bits_by_layer`` maps a layer name to ``(weight_bits, activation_bits)``; ``None`` or 32 is
    full precision. A layer that already has quantizers only has its bits changed. ``signed``
    optionally fixes the sign of a layer's input quantizer; otherwise it is decided from data (see
    :func:`calibrate_activation_ranges`). ``reduce_weight_range`` gives 8-bit weights the 7-bit
    grid of targets without VNNI (``DeployTarget.reduced_weights``); ``None`` keeps an existing
    quantizer's grid and gives new ones the full 8 bits. Layers not named are left as they are. Returns ``model``.
    """
    signed = signed or {}
    # Check every entry before changing anything, so a bad policy leaves the model untouched.
    resolved = []
    for name, (w_bits, a_bits) in bits_by_layer.items():
        resolved.append((name, _get_layer(model, name), check_bits(w_bits), check_bits(a_bits)))
    for name, module, w_bits, a_bits in resolved:
        wq = _weight_quantizer(module)
        if wq is None:
            wq = WeightQuantizer(w_bits, reduce_range=bool(reduce_weight_range))
            if _is_elastic(module):
                module.weight_quantizer = wq
            else:
                # unsafe=False checks the parametrization keeps the weight's shape and dtype.
                parametrize.register_parametrization(module, "weight", wq)
        else:
            wq.bits = w_bits
            if reduce_weight_range is not None:
                wq.reduce_range = reduce_weight_range
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


def attach_output_quantizers(
    model: nn.Module,
    names: Iterable[str],
    bits: int | None = 8,
    signed: Mapping[str, bool] | None = None,
    fixed_ranges: Mapping[str, tuple[float, bool]] | None = None,
) -> nn.Module:
    """Fake-quantize the output of every named module (any type) with a PACT quantizer.

    Opt-in, for deployment-faithful QAT: input quantizers cover what a conv / linear layer reads,
    but int8 kernels also round tensors no layer reads directly (a conv output before h-swish, both
    inputs and the output of a residual add, a tensor feeding a pool and a multiply, the logits).
    Quantizing those module outputs at training time, with ranges that
    :func:`calibrate_activation_ranges` initialises and training learns, removes that mismatch;
    ``convert_to_int8`` gives the int8 tensors the same ranges. Put at most one output quantizer
    on any tensor (a module whose output is another named module's output quantizes it twice).

    The quantizer is the submodule ``output_quantizer`` applied by a forward hook; attaching again
    only changes ``bits``. The sign is decided from data unless ``signed`` fixes it.
    ``fixed_ranges`` maps some of the names to a constant ``(alpha, signed)``: those quantizers are
    neither calibrated nor trained (``alpha`` has no gradient), for ops whose int8 kernels use
    fixed qparams (a hard-sigmoid gate is rounded to multiples of 1/256). Returns ``model``.
    """
    signed = signed or {}
    fixed_ranges = dict(fixed_ranges or {})
    names = list(names)
    unknown = sorted(set(fixed_ranges) - set(names))
    if unknown:
        raise KeyError(f"fixed_ranges names modules {unknown} that are not in names")
    bits = check_bits(bits)
    modules = []
    for name in names:  # check everything first, so a bad name leaves the model untouched
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as err:
            raise KeyError(f"no module named '{name}' in {type(model).__name__}: {err}") from None
        if isinstance(modules[-1], (WeightQuantizer, ActivationQuantizer)):
            raise TypeError(f"'{name}' is a quantizer; name the module whose output should be quantized")
    for name, module in zip(names, modules):
        quantizer = getattr(module, "output_quantizer", None)
        if isinstance(quantizer, ActivationQuantizer):
            quantizer.bits = bits
            if name in signed:
                quantizer.signed = bool(signed[name])
        else:
            quantizer = ActivationQuantizer(bits, signed=signed.get(name))
            reference = next(model.parameters(), None)
            if reference is not None:
                quantizer = quantizer.to(device=reference.device)
            module.output_quantizer = quantizer
            if not _output_hooks(module):
                module.register_forward_hook(_quantize_output_hook)
        if name in fixed_ranges:
            alpha, is_signed = fixed_ranges[name]
            quantizer.set_range(alpha, is_signed)
            quantizer.alpha.requires_grad_(False)
            quantizer.fixed_range = True  # read by calibration and int8 conversion
    return model


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _grid_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(codes, step, float bias)`` (float64, per output channel) of the bias a bias-grid holder
    adds, batch norm folded in with its running statistics; ``None`` while the layer is not quantized."""
    layer: nn.Module = module.__dict__["_bias_grid_layer"]
    wq, aq = _weight_quantizer(layer), _input_quantizer(layer)
    if wq is None or aq is None or wq.bits is None or aq.bits is None or not bool(aq.initialized):
        return None
    weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    with torch.no_grad():
        max_abs = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(max_abs)
        if module is not layer:  # batch norm folded into the layer, as torch's int8 conversion does
            gain = module.weight / torch.sqrt(module.running_var + module.eps)
            bias = module.bias + (bias - module.running_mean) * gain
            max_abs = max_abs * gain.abs()
        # the folded weight's scale as torch's per-channel observer sets it (eps for a zero channel)
        weight_step = (max_abs / wq.qrange()[1]).clamp_min(torch.finfo(torch.float32).eps)
        step = (aq.scale() * weight_step).double()
        # the runtime saturates a code to int32 (a channel of near-zero weights has a tiny step)
        codes = torch.round(bias.double() / step).clamp(-(2**31), 2**31 - 1)
    return codes, step, bias.double()


def _bias_grid_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    # Module-level like the quantizer hooks; the layer is kept outside the module registry.
    if isinstance(module, _BATCHNORMS) and module.training:
        return output  # batch statistics: the int8 model's folded bias does not exist yet
    grid = _grid_bias(module)
    if grid is None:
        return output
    codes, step, bias = grid
    residual = (codes * step - bias).to(output.dtype)
    return output + residual.reshape((1, -1) + (1,) * (output.dim() - 2))


def _bias_grid_hooks(module: nn.Module) -> list[int]:
    return [k for k, hook in module._forward_hooks.items() if hook is _bias_grid_hook]


def attach_bias_grids(model: nn.Module) -> list[str]:
    """Round each quantized layer's bias, batch norm folded in, to its int32 grid ``s_in * s_w``.

    For deployment on ONNX Runtime: its int8 conv/linear kernels add the bias as an int32 code
    of step ``s_in * s_w`` (per output channel), where torch's int8 kernels add the float bias.
    The rounding is at most half a step, yet measured on a CIFAR-10 OFA subnet it flipped 4.6 % of
    the top-1 predictions; trained with the grid, the model is what the runtime computes. A
    forward hook on the module whose output holds the bias (the batch norm following a conv, else
    the layer) adds the rounding residual, without gradient, before any output quantizer; with a
    batch norm in training mode (batch statistics) it does nothing. Needs a torch.fx-traceable model
    of plain conv/linear layers (an extracted subnet) to pair layers with batch norms. Attaching
    again changes nothing. Returns the names of the modules that got the hook.
    """
    layers = {n: model.get_submodule(n) for n in quantized_layers(model)}
    layers = {n: m for n, m in layers.items() if isinstance(m, _PLAIN_TYPES)}
    plain = copy.deepcopy(model)
    remove_quantizers(plain)
    graph = torch.fx.symbolic_trace(plain).graph
    followed_by: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in layers and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(plain.get_submodule(str(user.target)), _BATCHNORMS):
                followed_by[str(node.target)] = str(user.target)
    touched = []
    for name, layer in layers.items():
        holder_name = followed_by.get(name, name)
        holder = model.get_submodule(holder_name)
        if _bias_grid_hooks(holder):
            continue
        holder.__dict__["_bias_grid_layer"] = layer  # not a submodule: no second registration
        holder.register_forward_hook(_bias_grid_hook, prepend=True)
        touched.append(holder_name)
    return touched


def bias_grid_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose bias :func:`attach_bias_grids` puts on the int32 grid."""
    layers = {id(m): n for n, m in model.named_modules()}
    return [layers[id(m.__dict__["_bias_grid_layer"])] for m in model.modules() if _bias_grid_hooks(m)]


def bias_grid_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int32 bias codes the bias-grid hooks add, by layer name (quantized layers only).

    These, not codes recomputed from the converted model, are what a deployment must add: a float
    bias that lies within float rounding of a code boundary gets the other code when batch norm is
    folded once more in another order (torch's conversion folds ``w * (gamma * rsqrt(var + eps))``),
    as the weight codes would (``deploy.int8.training_weight_codes``).
    """
    layers = {id(m): n for n, m in model.named_modules()}
    out = {}
    for module in model.modules():
        if _bias_grid_hooks(module):
            grid = _grid_bias(module)
            if grid is not None:
                out[layers[id(module.__dict__["_bias_grid_layer"])]] = grid[0]
    return out


def has_bias_grids(model: nn.Module) -> bool:
    return bool(bias_grid_layers(model))


def has_fixed_range(quantizer: ActivationQuantizer) -> bool:
    """Whether an output quantizer's range is a constant (see ``fixed_ranges`` above)."""
    return bool(getattr(quantizer, "fixed_range", False))


def output_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Output quantizers attached by :func:`attach_output_quantizers`, by module name."""
    out = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "output_quantizer", None)
        if isinstance(quantizer, ActivationQuantizer) and _output_hooks(module):
            out[name] = quantizer
    return out


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
    """Take every quantizer off (output quantizers too), restoring the float weights; returns the
    modules touched."""
    touched = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            continue
        changed = False
        for key in _bias_grid_hooks(module):
            del module._forward_hooks[key]
            del module.__dict__["_bias_grid_layer"]
            changed = True
        hooks = _output_hooks(module)
        for key in hooks:
            del module._forward_hooks[key]
        if hooks and isinstance(getattr(module, "output_quantizer", None), ActivationQuantizer):
            del module.output_quantizer
            changed = True
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
    """Initialise every input (and output) quantizer's clipping value from observed statistics.

    The model runs in eval mode with all quantization switched off (statistics of the float
    network), each quantizer recording the ``percentile`` of its input magnitudes per batch
    (``percentile=100``: the maximum); the clipping value is the mean over batches and the sign
    is "signed" when any negative input was seen. Under an initialised ``torch.distributed``
    group the statistics are averaged (and the sign OR-ed) over ranks, so every rank ends up
    with the same ranges. A batch is a tensor, a ``(input, target, ...)`` sequence or a dict.

    Returns ``{layer name: (alpha, signed)}``; output quantizers of
    :func:`attach_output_quantizers` appear as ``"<module name>.output_quantizer"`` (those with
    fixed ranges are left alone). Fixed-range quantizers stay on during calibration, as in the
    int8 model.
    """
    layers = quantized_layers(model)
    quantizers: dict[str, ActivationQuantizer] = {name: aq for name, (_, aq) in layers.items()}
    quantizers.update(
        {
            f"{name}.output_quantizer": q
            for name, q in output_quantizers(model).items()
            if not has_fixed_range(q)
        }
    )
    saved = {name: (wq.bits, aq.bits) for name, (wq, aq) in layers.items()}
    saved_outputs = {name: q.bits for name, q in quantizers.items() if name not in layers}
    stats: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in quantizers}  # clip sum, count, min

    def observe(name: str, quantizer: ActivationQuantizer):  # noqa: ANN202 - hook factory
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            entry = stats[name]
            entry[2] = min(entry[2], float(x.min()))
            signed = quantizer.signed if quantizer.signed is not None else entry[2] < 0
            entry[0] += observed_clip(x, signed, percentile)
            entry[1] += 1

        return hook

    handles = [q.register_forward_pre_hook(observe(name, q)) for name, q in quantizers.items()]
    # Per-module flags: model.train(flag) afterwards would also undo deliberate per-module modes.
    modes = {module: module.training for module in model.modules()}
    device = next((p.device for p in model.parameters()), None)
    try:
        for q in quantizers.values():
            q.bits = None
        for wq, _ in layers.values():
            wq.bits = None
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
        for name, bits in saved_outputs.items():
            quantizers[name].bits = bits
        for module, mode in modes.items():
            module.training = mode

    # Every quantizer is reduced, seen or not, so that all ranks pass tensors of the same shape.
    names = list(quantizers)
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
        aq = quantizers[name]
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
