"""Real int8 deployment of an extracted subnet: torch FX graph-mode quantization and ONNX QDQ.

Route checked on torch 2.15: ``torch.ao.quantization.quantize_fx.prepare_fx`` / ``convert_fx``
still work (they emit a DeprecationWarning pointing to torchao's pt2e flow, which is not installed
here) and produce fbgemm/onednn int8 kernels with the ``x86`` engine. The converted model exports
to ONNX with the TorchScript exporter (``dynamo=False``; the dynamo exporter needs ``onnxscript``,
absent here) as QuantizeLinear/DequantizeLinear (QDQ) pairs around float ops, which onnxruntime
fuses into its own int8 kernels.

Agreement with the fake-quantized training model comes from using the same grids:

* weights: per-output-channel symmetric ``[-127, 127]`` with scale ``max|w| / 127``, the grid of
  :class:`~lightning_nas.nn.quant.WeightQuantizer`. FX folds batch norm into the convolution
  first; a per-channel rescaling does not move a weight relative to its channel's grid in exact
  arithmetic, but float rounding of the folded weight decides some .5 ties the other way, so the
  integers training saw are written into the converted layers afterwards (FX's folded scales kept).
* rounding: the fake quantizers round ``x * (1 / scale)`` as torch's int8 kernels do, and a signed
  activation grid has the codes ``-128..127`` of a zero-point-128 quint8 tensor.
* activations: the input of every quantized conv/linear gets the learned PACT range of its
  quantizer, as a fixed-qparams observer on the tensor that feeds it (unsigned: ``alpha / 255``,
  zero point 0; signed: ``alpha / 127``, zero point 128).
* average pools run in float (:class:`FloatAvgPool`): FX's int8 pool must reuse its input's
  qparams, which would round a squeeze-excite or classifier input on the coarse grid of the map
  it was pooled from and leave no place for the layer's learned range.
* dropout is removed from the graph (the converted model is for inference): FX keeps the qparams
  of a dropout's input and ignores the observer after it, which would drop the learned input range
  of the layer behind it (the classifier).
* a layer whose input tensor also feeds other ops (the block input that is also the residual)
  gets its own requantized copy (:class:`Requantize`): training clips that input for the layer
  only, so the residual path must keep an unclipped version.

Why one module of about 750 lines: every step above rewrites or reads the same FX graph with
private helpers (the tracer, the rewrite, the carried ranges, codes and bias grids, and the export
that rounds the codes the conversion carried); split, those helpers would become a public API
that nothing else should call.
* tensors that the training graph never quantized (a conv output before h-swish or before a
  residual add, the SE product, a block output) must be int8 in the real model; their ranges come
  from a calibration pass (histogram observer), so they add 8-bit rounding that training did not
  see. This is the remaining gap between the two models, and it grows with depth (measured: about
  2 % relative logit error on a two-block net, more on a 15-block OFA subnet). Training can close
  it: output quantizers (:func:`~lightning_nas.nn.quantize_model.attach_output_quantizers`) on
  the modules producing those tensors make QAT see the rounding, and their learned ranges are
  carried over here too (an identity marker after each such module output pins the int8 tensor's
  qparams; a layer reading a marked tensor gets its own :class:`Requantize` copy, since training
  quantizes it twice).
* activations use the full 8-bit range (no ``reduce_range``); what a CPU without VNNI needs is
  fixed by the deployment target instead (:mod:`lightning_nas.targets`): 7-bit weights, which
  the fake quantizers train with and the conversion keeps (``weight_qmax``). The full range is
  exact with the ``onednn`` engine on CPUs with VNNI (oneDNN's AVX2 kernels saturate, measured
  with ``ONEDNN_MAX_CPU_ISA=AVX2``) and with fbgemm's GEMM-based convolutions there, but fbgemm's depthwise
  kernels add pairs of u8 x s8 products in int16 even there and saturate (measured here: up to
  22 % error on one 3x3 depthwise layer with large weights and activations, and top-1 agreement
  with the fake-quantized model falling from 99.8 % to 98.6 % on a 20-block OFA subnet, where the
  ``x86`` engine picked fbgemm). Convert with ``backend="onednn"`` when agreement matters; it was
  as fast as ``x86`` on these CPUs.
* the conversion needs a torch.fx-traceable model: an extracted plain subnet, not the supernet.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_nas.files import replacing
from lightning_nas.nn.metrics import percent_accuracy
from lightning_nas.nn.quantize_model import (
    _batch_input,
    bias_grid_codes,
    has_fixed_range,
    output_quantizers,
    quantized_layers,
    remove_quantizers,
)

_AVG_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = {
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
}
_AVG_POOL_FUNCTIONS = {
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.mean,
    "mean",  # Tensor.mean, as OFA's squeeze-excite pools
}


class _Quiet:
    """Silence the tracer's chatter around conversion and export, never a deprecation.

    The APIs this module relies on are deprecated (torch.ao.quantization, quantized tensors, the
    TorchScript ONNX exporter and its torch.jit.trace; listed in docs/benchmarks.md, "Deprecated
    APIs relied on"): their warnings stay visible. Hidden: the ONNX tracer's TracerWarnings about
    Python values it records as constants, and UserWarnings that are not deprecations.
    """

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=r"(?![\s\S]*deprecat)", category=UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # from the ONNX exporter's trace

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def learned_activation_qparams(model: nn.Module) -> dict[str, tuple[float, int]]:
    """quint8 ``(scale, zero_point)`` of each layer's learned 8-bit input range, by layer name.

    Raises ``ValueError`` for a layer whose policy is not 8/8 bits or full precision: only a
    uniform 8-bit policy has an int8 counterpart.
    """
    out: dict[str, tuple[float, int]] = {}
    for name, (wq, aq) in quantized_layers(model).items():
        bits = (wq.bits, aq.bits)
        if bits == (None, None):
            continue
        if bits != (8, 8):
            raise ValueError(
                f"int8 deployment needs a uniform 8-bit policy; layer '{name}' uses "
                f"(weight, activation) bits {bits}"
            )
        if not bool(aq.initialized):
            raise ValueError(
                f"layer '{name}': input quantizer range never initialised; run calibration first"
            )
        alpha = float(aq.alpha.detach().abs())
        if aq.signed:
            out[name] = (alpha / 127.0, 128)
        else:
            out[name] = (alpha / 255.0, 0)
    return out


def learned_output_qparams(model: nn.Module) -> dict[str, tuple[float, int]]:
    """quint8 ``(scale, zero_point)`` of each 8-bit output quantizer's learned range, by module name.

    Full-precision output quantizers are skipped, and so are fixed-range ones (they stand for an
    op's own fixed int8 qparams, see :func:`fixed_output_range`); other bit widths raise
    ``ValueError``.
    """
    out: dict[str, tuple[float, int]] = {}
    for name, quantizer in output_quantizers(model).items():
        if quantizer.bits is None or has_fixed_range(quantizer):
            continue
        if quantizer.bits != 8:
            raise ValueError(
                f"int8 deployment needs 8-bit output quantizers; '{name}' uses {quantizer.bits} bits"
            )
        if not bool(quantizer.initialized):
            raise ValueError(f"output quantizer of '{name}' never initialised; run calibration first")
        alpha = float(quantizer.alpha.detach().abs())
        out[name] = (alpha / 127.0, 128) if quantizer.signed else (alpha / 255.0, 0)
    return out


def fixed_output_range(module: nn.Module, backend: str = "x86") -> tuple[float, bool] | None:
    """``(alpha, signed)`` of the 8-bit quantizer that reproduces the fixed output qparams FX
    quantization gives ``module`` (hard sigmoid, sigmoid, tanh, ...), or ``None`` for other ops.

    E.g. ``nn.Hardsigmoid`` outputs are rounded to multiples of 1/256 in ``[0, 255/256]``: an
    unsigned quantizer with ``alpha = 255/256``. Pass it as ``fixed_ranges`` to
    :func:`~lightning_nas.nn.quantize_model.attach_output_quantizers` so QAT sees that rounding.
    """
    from torch.ao.quantization.observer import FixedQParamsObserver

    qconfig = int8_qconfig_mapping(backend).object_type_qconfigs.get(type(module))
    if qconfig is None:
        return None
    observer = qconfig.activation()
    if not isinstance(observer, FixedQParamsObserver):
        return None
    scale, zero_point = (float(observer.scale), int(observer.zero_point))
    if zero_point == 0:
        return scale * 255.0, False
    return scale * 127.0, True  # zero point 128: codes -128..127, the signed activation grid


def trained_weight_qmax(model: nn.Module) -> int | None:
    """The largest code of the model's 8-bit weight grid (127, or 63 when trained for a target
    without VNNI), or ``None`` for a model without 8-bit weight quantizers."""
    found = {wq.qrange()[1] for wq, _ in quantized_layers(model).values() if wq.bits == 8}
    if len(found) > 1:
        raise ValueError(f"the model mixes 8-bit weight grids (largest codes {sorted(found)}); train it for one target")
    return found.pop() if found else None


def _full_precision_layers(model: nn.Module) -> list[str]:
    return [n for n, (wq, aq) in quantized_layers(model).items() if (wq.bits, aq.bits) == (None, None)]


def int8_qconfig_mapping(backend: str = "x86", observer: str = "histogram", weight_qmax: int = 127) -> Any:
    """The backend's default mapping with the training grids as global qconfig.

    ``weight_qmax`` is the largest weight code (127, or 63 for the 7-bit grid of targets
    without VNNI).

    ``observer`` picks how activations the training graph never quantized get their range:
    ``"histogram"`` (minimises the rounding-plus-clipping error; the better match on heavy-tailed
    conv outputs) or ``"minmax"`` (never clips the calibration data).
    """
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

    observers = {"histogram": HistogramObserver, "minmax": MinMaxObserver}
    if observer not in observers:
        raise ValueError(f"observer must be one of {sorted(observers)}, got {observer!r}")
    qconfig = QConfig(
        activation=observers[observer].with_args(dtype=torch.quint8, quant_min=0, quant_max=255),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-weight_qmax, quant_max=weight_qmax
        ),
    )
    # Keep the default entries for fixed-qparams ops (hardsigmoid, sigmoid, ...) and reshape.
    return get_default_qconfig_mapping(backend).set_global(qconfig)


class FloatAvgPool(nn.Module):
    """An average pool kept in float inside the int8 graph.

    FX int8 pooling must reuse its input's qparams, so a squeeze-excite or classifier input
    (pooled values, much smaller than the map they come from) would be rounded on the map's coarse
    grid. Run in float, the pool gets a dequantize before it and its consumer gets its own input
    range: the learned one. The dequantize costs little next to the convolutions.
    """

    def __init__(self, fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fn = fn  # an nn.Module is registered as a submodule by nn.Module.__setattr__
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fn, str):
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)


class Requantize(nn.Module):
    """Identity kept in float inside the int8 graph, so that its output is quantized afresh.

    Training quantizes the input of each layer, not the tensor: a block input that feeds both the
    expand convolution and the residual add is clipped to the convolution's learned range on one
    path only. In int8 the tensor has one quantized version, so the layer gets its own copy
    (dequantize, then quantize with the learned range) while the add keeps an unclipped one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _OutputTracer(torch.fx.Tracer):
    """``symbolic_trace`` that also records the graph node producing each named module's output."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.wanted = set(names)
        self.outputs: dict[str, torch.fx.Node] = {}

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        if path in self.wanted and isinstance(out, torch.fx.Proxy):
            self.outputs[path] = out.node
        return out


def _rewrite_for_int8(
    model: nn.Module,
    float_avg_pool: bool,
    requantize_layers: Iterable[str],
    output_ranges: Iterable[str] = (),
) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """Trace ``model``; put an ``nn.Identity`` marker after the output of each module named in
    ``output_ranges`` (FX quantization shares qparams across an identity, so fixing the observer
    after the marker fixes the marked tensor's qparams, at no run-time cost), wrap average pools in :class:`FloatAvgPool` and put a :class:`Requantize`
    before each named layer whose input tensor has other consumers or is marked. Layer names are
    unchanged. Returns the graph module and ``{marker submodule name: module name}``."""
    tracer = _OutputTracer(output_ranges)
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    # Dropout is the identity at inference, but FX ignores the observer after it and keeps its
    # input's qparams: a learned input range of the layer behind it (the classifier) would be lost.
    for node in list(gm.graph.nodes):
        is_dropout = (
            node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _DROPOUT_MODULES)
        ) or (node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS)
        if is_dropout and node.args and isinstance(node.args[0], torch.fx.Node):
            for name, node_out in tracer.outputs.items():
                if node_out is node:
                    tracer.outputs[name] = node.args[0]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    markers: dict[str, str] = {}
    marker_nodes: set[torch.fx.Node] = set()
    for index, (module_name, node) in enumerate(tracer.outputs.items()):
        name = f"output_range_{index}"
        gm.add_submodule(name, nn.Identity())  # the exact type: FX matches patterns by type
        with gm.graph.inserting_after(node):
            marker = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(marker, delete_user_cb=lambda user, m=marker: user is not m)
        markers[name] = module_name
        marker_nodes.add(marker)
    for index, node in enumerate(list(gm.graph.nodes)):
        if not float_avg_pool or not _is_avg_pool(gm, node) or not node.args:
            continue
        extra = list(node.args[1:]) + list(node.kwargs.values())
        if any(isinstance(a, torch.fx.Node) for a in extra):
            continue  # pool parameters computed in the graph: leave it to FX's int8 pool
        if node.op == "call_module":
            wrapper = FloatAvgPool(gm.get_submodule(str(node.target)))
        else:
            wrapper = FloatAvgPool(node.target, node.args[1:], node.kwargs)
        name = f"float_avg_pool_{index}"
        gm.add_submodule(name, wrapper)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    targets = set(requantize_layers)
    for index, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_module" or str(node.target) not in targets or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or (len(source.users) < 2 and source not in marker_nodes):
            continue
        name = f"requantize_{index}"
        gm.add_submodule(name, Requantize())
        with gm.graph.inserting_before(node):
            copy_node = gm.graph.call_module(name, (source,))
        node.replace_input_with(source, copy_node)
    gm.recompile()
    return gm, markers


def _is_avg_pool(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _AVG_POOL_MODULES)
    if node.op in ("call_function", "call_method"):
        return node.target in _AVG_POOL_FUNCTIONS
    return False


def _apply_learned_ranges(
    prepared: torch.fx.GraphModule, qparams: dict[str, tuple[float, int]]
) -> tuple[list[str], list[str]]:
    """Swap the observers feeding quantized layers for fixed observers with learned qparams.

    Returns the layers whose range was carried over and those left to calibration.
    """
    from torch.ao.quantization.observer import FixedQParamsObserver, ObserverBase

    modules = dict(prepared.named_modules(remove_duplicate=False))

    def observer_of(node: Any) -> ObserverBase | None:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            mod = modules.get(str(node.target))
            if isinstance(mod, ObserverBase):
                return mod
        return None

    # Every tensor an observer object watches (FX shares one object across qparams-sharing ops).
    watched: dict[int, list[torch.fx.Node]] = {}
    for node in prepared.graph.nodes:
        obs = observer_of(node)
        if obs is not None and node.args and isinstance(node.args[0], torch.fx.Node):
            watched.setdefault(id(obs), []).append(node.args[0])

    replacement: dict[int, ObserverBase] = {}
    carried, skipped = [], []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or str(node.target) not in qparams:
            continue
        obs = observer_of(node.args[0]) if node.args else None
        if obs is None or any(_is_avg_pool(prepared, p) for p in watched.get(id(obs), [])):
            skipped.append(str(node.target))
            continue
        if id(obs) in replacement:  # a tensor feeding two quantized layers: the first one wins
            skipped.append(str(node.target))
            continue
        scale, zero_point = qparams[str(node.target)]
        replacement[id(obs)] = FixedQParamsObserver(
            scale=scale, zero_point=zero_point, dtype=torch.quint8, quant_min=0, quant_max=255
        )
        carried.append(str(node.target))

    # Replace under every name the object has, so shared observers stay shared.
    for name, mod in list(prepared.named_modules(remove_duplicate=False)):
        if id(mod) in replacement:
            parent_name, _, attr = name.rpartition(".")
            setattr(prepared.get_submodule(parent_name), attr, replacement[id(mod)])
    return carried, skipped


def _apply_output_ranges(
    prepared: torch.fx.GraphModule, marker_qparams: dict[str, tuple[float, int]]
) -> tuple[list[str], list[str]]:
    """Fix the observer after each output-range marker (``{marker name: qparams}``) to the
    learned qparams. Returns the marker names carried over and those left to calibration (an
    observer already fixed by a layer's learned input range, or no observer at all)."""
    from torch.ao.quantization.observer import FixedQParamsObserver, ObserverBase

    modules = dict(prepared.named_modules(remove_duplicate=False))
    replacement: dict[int, ObserverBase] = {}
    carried, skipped = [], []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or str(node.target) not in marker_qparams:
            continue
        observers = [modules.get(str(u.target)) for u in node.users if u.op == "call_module"]
        observers = [o for o in observers if isinstance(o, ObserverBase)]
        if not observers or isinstance(observers[0], FixedQParamsObserver) or id(observers[0]) in replacement:
            skipped.append(str(node.target))
            continue
        scale, zero_point = marker_qparams[str(node.target)]
        replacement[id(observers[0])] = FixedQParamsObserver(
            scale=scale, zero_point=zero_point, dtype=torch.quint8, quant_min=0, quant_max=255
        )
        carried.append(str(node.target))
    for name, mod in list(prepared.named_modules(remove_duplicate=False)):
        if id(mod) in replacement:
            parent_name, _, attr = name.rpartition(".")
            setattr(prepared.get_submodule(parent_name), attr, replacement[id(mod)])
    return carried, skipped


def _calibrated_observers(prepared: torch.fx.GraphModule) -> int:
    """Distinct observers whose qparams still come from calibration data."""
    from torch.ao.quantization.observer import FixedQParamsObserver, ObserverBase

    return len(
        {
            id(m)
            for m in prepared.modules()
            if isinstance(m, ObserverBase) and not isinstance(m, FixedQParamsObserver)
        }
    )


@torch.no_grad()
def convert_to_int8(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    example_input: torch.Tensor | None = None,
    backend: str | None = None,
    carry_learned_ranges: bool = True,
    max_batches: int | None = None,
    float_avg_pool: bool = True,
    requantize_shared_inputs: bool = True,
    observer: str = "histogram",
    target: Any = None,
) -> torch.fx.GraphModule:
    """Convert a plain PyTorch model (an extracted subnet) to real int8 kernels with FX mode.

    ``model`` may carry fake quantizers from :mod:`lightning_nas.nn.quantize_model` with a
    uniform 8-bit policy; their learned input ranges are carried over (see the module docstring)
    and layers at full precision stay float. Without quantizers this is ordinary post-training
    quantization. ``calibration_batches`` (tensors, ``(input, target)`` pairs or dicts) set the
    ranges of the remaining activations. The model is copied, not changed. The result records
    ``carried_ranges`` / ``calibrated_ranges`` (layer names) as attributes.

    ``float_avg_pool`` runs average pools in float (:class:`FloatAvgPool`) and
    ``requantize_shared_inputs`` gives a layer whose input also feeds other ops its own quantized
    copy (:class:`Requantize`); both bring the int8 graph closer to the training graph at the cost
    of a dequantize/quantize pair each. Sets ``torch.backends.quantized.engine`` to ``backend``,
    which the returned model needs at run time too.

    ``target`` (a :class:`~lightning_nas.targets.DeployTarget` or its name) gives ``backend`` its
    engine unless ``backend`` is set (without either: ``x86``) and must match the weight grid the model was trained with (``ValueError`` otherwise);
    without it the model's own grid is used.

    Output quantizers (:func:`~lightning_nas.nn.quantize_model.attach_output_quantizers`) carry
    their learned ranges to the int8 tensors they produce when ``carry_learned_ranges`` is set;
    the result then also records ``carried_output_ranges`` / ``calibrated_output_ranges`` (module
    names) and ``calibrated_tensors``, the number of int8 tensors whose range came from the
    calibration batches (0 when training saw every rounding the int8 model does).
    """
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    weight_qmax = trained_weight_qmax(model)
    if target is not None:
        from lightning_nas.targets import resolve_target

        target = resolve_target(target)
        backend = backend or target.engine
        if weight_qmax is not None and weight_qmax != target.weight_qmax:
            raise ValueError(
                f"the model was trained with 8-bit weight codes up to {weight_qmax}, target {target.name} "
                f"deploys codes up to {target.weight_qmax}: finetune it for {target.name}"
            )
        weight_qmax = target.weight_qmax
    weight_qmax = weight_qmax or 127
    backend = backend or "x86"
    qparams = learned_activation_qparams(model) if carry_learned_ranges else {}
    output_qparams = learned_output_qparams(model) if carry_learned_ranges else {}
    float_layers = _full_precision_layers(model)
    weight_codes = training_weight_codes(model) if carry_learned_ranges else {}
    layers = quantized_layers(model)
    # the codes training added, not recomputed here: see bias_grid_codes
    grid_codes = {n: c.cpu() for n, c in bias_grid_codes(model).items()} if carry_learned_ranges else {}
    input_steps = {n: float(layers[n][1].scale()) for n in grid_codes}
    float_model = copy.deepcopy(model).cpu().eval()
    remove_quantizers(float_model)

    batches = iter(calibration_batches)
    if example_input is None:
        first = next(batches, None)
        if first is None:
            raise ValueError("convert_to_int8 needs calibration batches or an example input")
        example_input = _batch_input(first)
        batches = _chain([first], batches)
    example_input = example_input.detach().cpu()

    torch.backends.quantized.engine = backend
    mapping = int8_qconfig_mapping(backend, observer, weight_qmax)
    for name in float_layers:
        mapping.set_module_name(name, None)
    custom = PrepareCustomConfig().set_non_traceable_module_classes([FloatAvgPool, Requantize])
    with _Quiet():
        try:
            requantize = list(qparams) if requantize_shared_inputs else []
            float_model, markers = _rewrite_for_int8(float_model, float_avg_pool, requantize, output_qparams)
            prepared = prepare_fx(float_model, mapping, (example_input,), prepare_custom_config=custom)
        except Exception as err:  # torch.fx raises many types; the hint is the useful part
            raise RuntimeError(
                f"torch.fx could not trace {type(model).__name__} ({err}); int8 conversion needs a plain, "
                "extracted subnet without data-dependent control flow"
            ) from err
        carried, skipped = _apply_learned_ranges(prepared, qparams) if qparams else ([], [])
        marker_qparams = {marker: output_qparams[module] for marker, module in markers.items()}
        carried_out, skipped_out = _apply_output_ranges(prepared, marker_qparams) if markers else ([], [])
        calibrated_tensors = _calibrated_observers(prepared)
        seen = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            prepared(_batch_input(batch).detach().cpu())
            seen += 1
        if seen == 0:
            prepared(example_input)
        quantized = convert_fx(prepared)
    replaced_codes = _carry_weight_codes(quantized, weight_codes)
    # the grid's input step is the learned range's, so only where that range was carried over
    _round_biases_to_grid(quantized, {n: (input_steps[n], grid_codes[n]) for n in grid_codes if n in carried})
    quantized.carried_ranges = carried
    quantized.replaced_weight_codes = replaced_codes
    quantized.calibrated_ranges = skipped
    quantized.carried_output_ranges = [markers[m] for m in carried_out]
    quantized.calibrated_output_ranges = [markers[m] for m in skipped_out]
    quantized.calibrated_tensors = calibrated_tensors
    quantized.weight_qmax = weight_qmax
    quantized.engine = backend
    return quantized


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def training_weight_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer weights of every 8-bit quantized layer, as its weight quantizer rounds them."""
    codes = {}
    for name, (weight_quantizer, _) in quantized_layers(model).items():
        if weight_quantizer.bits != 8:
            continue
        layer = model.get_submodule(name)
        weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
        codes[name] = weight_quantizer.codes(weight).cpu()
    return codes


def _carry_weight_codes(quantized: torch.fx.GraphModule, codes: dict[str, torch.Tensor]) -> int:
    """Give each converted conv/linear the integer weights training used; returns how many
    integers changed.

    FX folds batch norm into the float weight and rounds ``w * gamma / sigma`` on a rescaled grid:
    in exact arithmetic the same integers (up to the sign of ``gamma``), but float rounding moves
    about 3 in 10,000 of them across a .5 boundary. The scales stay FX's (the folded ones); the
    sign of each channel is read off the converted weights, since batch norm may flip it.
    """
    changed = 0
    for name, trained in codes.items():
        try:
            layer = quantized.get_submodule(name)
        except AttributeError:
            continue
        if not hasattr(layer, "set_weight_bias"):
            continue
        weight = layer.weight()
        if weight.qscheme() not in _PER_CHANNEL or weight.shape != trained.shape:
            continue
        converted = weight.int_repr().to(torch.float32)
        agreement = (converted * trained).reshape(len(trained), -1).sum(dim=1)
        sign = torch.where(agreement < 0, -1.0, 1.0).reshape((-1,) + (1,) * (trained.dim() - 1))
        new_codes = trained * sign
        changed += int((new_codes != converted).sum())
        new_weight = torch._make_per_channel_quantized_tensor(
            new_codes.to(torch.int8),
            weight.q_per_channel_scales(),
            weight.q_per_channel_zero_points(),
            weight.q_per_channel_axis(),
        )
        layer.set_weight_bias(new_weight, layer.bias())
    return changed


def _round_biases_to_grid(quantized: torch.fx.GraphModule, grids: dict[str, tuple[float, torch.Tensor]]) -> None:
    """Put each named layer's float bias on its int32 grid ``s_in * s_w`` (``s_w``: the converted,
    batch-norm-folded weight scales) with the codes training added
    (:func:`~lightning_nas.nn.quantize_model.bias_grid_codes`; ``grids``: ``{layer: (s_in, codes)}``):
    torch's kernels add the float bias, ONNX Runtime's the int32 code, and both then compute what
    training saw. Rounding the converted bias instead picks another code wherever training left the
    float bias within float rounding of a code boundary (BN folded in another order)."""
    for name, (input_step, codes) in grids.items():
        layer = quantized.get_submodule(name)
        bias = layer.bias()
        if bias is None:
            continue
        step = input_step * layer.weight().q_per_channel_scales().double()
        exact = bias.detach().double() / step
        if codes.shape != exact.shape or float((codes - exact).abs().max()) > 1.0 + 1e-3:
            raise RuntimeError(f"layer {name}: the trained bias codes do not belong to its converted bias")
        layer.set_weight_bias(layer.weight(), (codes * step).to(bias.dtype))


def _chain(head: list[Any], tail: Iterable[Any]) -> Iterable[Any]:
    yield from head
    yield from tail


def export_onnx(
    int8_model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Export an FX-converted int8 model to ONNX in QDQ form and check the file with ``onnx``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with replacing(path) as temporary:
        with _Quiet():
            torch.onnx.export(
                int8_model,
                (example_input.detach().cpu(),),
                str(temporary),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
            )
        exported = onnx.load(str(temporary))
        if _round_bias_codes(int8_model, exported):
            onnx.save(exported, str(temporary))
        onnx.checker.check_model(exported)
    return path


def _quantized_layers_in_call_order(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, torch.fx.GraphModule):
        return []
    layers = []
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        layer = model.get_submodule(str(node.target))
        if hasattr(layer, "set_weight_bias") and layer.weight().is_quantized:
            layers.append(layer)
    return layers


def _round_bias_codes(int8_model: nn.Module, exported: Any) -> int:
    """Round each exported int32 conv/linear bias to the nearest code; returns how many changed.

    torch's QDQ exporter writes ``Cast(bias / (s_in * s_w), INT32)``, and the cast truncates
    toward zero: every bias lands up to one step of its grid short of the float bias torch's int8
    kernels add (measured on a CIFAR-10 OFA subnet: 3,981 of 7,978 codes one step off, the
    largest error 0.998 step). The codes are recomputed from the int8 layers' float biases, which
    follow the ONNX Conv/Gemm nodes in graph order.
    """
    from onnx import numpy_helper

    layers = _quantized_layers_in_call_order(int8_model)
    if not layers:
        return 0
    graph = exported.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    if len(nodes) != len(layers):
        raise RuntimeError(f"{len(layers)} int8 conv/linear layers but {len(nodes)} ONNX Conv/Gemm nodes")

    def constant(name: str) -> tuple[np.ndarray, Any] | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name]), initializers[name]
        node = producer.get(name)
        if node is not None and node.op_type == "Identity":
            return constant(node.input[0])
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t), node.attribute[0].t
        return None

    changed = 0
    for layer, node in zip(layers, nodes):
        bias = layer.bias()
        dequantize = producer.get(node.input[2]) if len(node.input) > 2 else None
        if bias is None or dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        codes, scale = constant(dequantize.input[0]), constant(dequantize.input[1])
        if codes is None or scale is None or codes[0].dtype != np.int32:
            raise RuntimeError(f"ONNX node {node.name}: its int32 bias is not a constant")
        exact = bias.detach().double().numpy() / scale[0].astype(np.float64)
        if codes[0].shape != exact.shape or np.abs(codes[0] - exact).max() > 1.0 + 1e-3:
            raise RuntimeError(f"ONNX node {node.name}: its bias does not belong to layer {layer}")
        rounded = np.clip(np.round(exact), -(2**31), 2**31 - 1).astype(np.int32)
        changed += int((rounded != codes[0]).sum())
        codes[1].CopyFrom(numpy_helper.from_array(rounded, codes[1].name))
    return changed


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` with full graph optimisation (QDQ fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run a single-input session and return its first output."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run(None, {session.get_inputs()[0].name: array.astype(np.float32)})[0]


def top1_agreement(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray) -> float:
    """Percent of rows whose arg-max agrees between two logit arrays: the top-1 accuracy of
    ``first`` against ``second``'s predicted classes, in the package's one accuracy unit."""
    a, b = torch.as_tensor(_as_array(first)), torch.as_tensor(_as_array(second))
    if a.shape != b.shape:
        raise ValueError(f"logit arrays disagree in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(percent_accuracy(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]).argmax(dim=1)))


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
