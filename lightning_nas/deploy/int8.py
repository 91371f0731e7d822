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
  first; a per-channel rescaling does not move a weight relative to its channel's grid, so the
  integers are the ones training saw.
* activations: the input of every quantized conv/linear gets the learned PACT range of its
  quantizer, as a fixed-qparams observer on the tensor that feeds it (unsigned: ``alpha / 255``,
  zero point 0; signed: ``alpha / 127``, zero point 128).
* average pools run in float (:class:`FloatAvgPool`): FX's int8 pool must reuse its input's
  qparams, which would round a squeeze-excite or classifier input on the coarse grid of the map
  it was pooled from and leave no place for the layer's learned range.
* a layer whose input tensor also feeds other ops (the block input that is also the residual)
  gets its own requantized copy (:class:`Requantize`): training clips that input for the layer
  only, so the residual path must keep an unclipped version.
* tensors that the training graph never quantized (a conv output before h-swish or before a
  residual add, the SE product, a block output) must be int8 in the real model; their ranges come
  from a calibration pass (histogram observer), so they add 8-bit rounding that training did not
  see. This is the remaining gap between the two models, and it grows with depth (measured: about
  2 % relative logit error on a two-block net, more on a 15-block OFA subnet).
* activations use the full 8-bit range (no ``reduce_range``). That is exact on CPUs with VNNI
  (int32 accumulation); on older AVX2-only CPUs fbgemm's int16 intermediate can saturate.
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

from lightning_nas.nn.quantize_model import _batch_input, quantized_layers, remove_quantizers

_AVG_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_AVG_POOL_FUNCTIONS = {
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.mean,
    "mean",  # Tensor.mean, as OFA's squeeze-excite pools
}


class _Quiet:
    """Silence torch.ao's deprecation chatter around conversion; real errors still raise."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
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


def _full_precision_layers(model: nn.Module) -> list[str]:
    return [n for n, (wq, aq) in quantized_layers(model).items() if (wq.bits, aq.bits) == (None, None)]


def int8_qconfig_mapping(backend: str = "x86", observer: str = "histogram") -> Any:
    """The backend's default mapping with the training grids as global qconfig.

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
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
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


def _rewrite_for_int8(
    model: nn.Module, float_avg_pool: bool, requantize_layers: Iterable[str]
) -> torch.fx.GraphModule:
    """Trace ``model``; wrap average pools in :class:`FloatAvgPool` and put a :class:`Requantize`
    before each named layer whose input tensor has other consumers. Layer names are unchanged."""
    gm = torch.fx.symbolic_trace(model)
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
        if not isinstance(source, torch.fx.Node) or len(source.users) < 2:
            continue
        name = f"requantize_{index}"
        gm.add_submodule(name, Requantize())
        with gm.graph.inserting_before(node):
            copy_node = gm.graph.call_module(name, (source,))
        node.replace_input_with(source, copy_node)
    gm.recompile()
    return gm


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


@torch.no_grad()
def convert_to_int8(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    example_input: torch.Tensor | None = None,
    backend: str = "x86",
    carry_learned_ranges: bool = True,
    max_batches: int | None = None,
    float_avg_pool: bool = True,
    requantize_shared_inputs: bool = True,
    observer: str = "histogram",
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
    """
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    qparams = learned_activation_qparams(model) if carry_learned_ranges else {}
    float_layers = _full_precision_layers(model)
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
    mapping = int8_qconfig_mapping(backend, observer)
    for name in float_layers:
        mapping.set_module_name(name, None)
    custom = PrepareCustomConfig().set_non_traceable_module_classes([FloatAvgPool, Requantize])
    with _Quiet():
        try:
            requantize = list(qparams) if requantize_shared_inputs else []
            float_model = _rewrite_for_int8(float_model, float_avg_pool, requantize)
            prepared = prepare_fx(float_model, mapping, (example_input,), prepare_custom_config=custom)
        except Exception as err:  # torch.fx raises many types; the hint is the useful part
            raise RuntimeError(
                f"torch.fx could not trace {type(model).__name__} ({err}); int8 conversion needs a plain, "
                "extracted subnet without data-dependent control flow"
            ) from err
        carried, skipped = _apply_learned_ranges(prepared, qparams) if qparams else ([], [])
        seen = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            prepared(_batch_input(batch).detach().cpu())
            seen += 1
        if seen == 0:
            prepared(example_input)
        quantized = convert_fx(prepared)
    quantized.carried_ranges = carried
    quantized.calibrated_ranges = skipped
    return quantized


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
    with _Quiet():
        torch.onnx.export(
            int8_model,
            (example_input.detach().cpu(),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    return path


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
    """Fraction of rows whose arg-max agrees between two logit arrays."""
    a = _as_array(first).argmax(axis=-1)
    b = _as_array(second).argmax(axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"logit arrays disagree in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).mean())


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
