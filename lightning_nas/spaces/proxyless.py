"""The ProxylessNAS search space on the MobileNetV2 layout, described without torch.

Single source of truth for the over-parameterised network (:mod:`lightning_nas.nn.proxyless_net`),
the derived standalone network, the per-candidate cost tables of the search and the derived
architecture files. Importable without torch: recipe validation and cost tables read it.

Layout: a 3x3 stem convolution, one fixed MBConv (expand 1, 3x3), then ``len(stage_widths)``
stages of ``stage_depths[s]`` *searchable layers*, a 1x1 feature-mix convolution to
``feature_channels``, global pooling and the classifier. Every searchable layer chooses one op
from ``candidate_ops``:

* ``"{k}x{k}_MBConv{e}"``: an inverted residual block with a k x k depthwise convolution and
  expand ratio e (``3x3_MBConv6``); without a 1x1 expand convolution when ``e == 1``;
* ``"zero"``: the layer is skipped. It is a candidate only where the layer has an identity
  shortcut (stride 1 and equal channels: every layer but the first of a stage), because only
  there does skipping keep the shapes.

An architecture (the *config* of a derived network) is the list of op names, one per searchable
layer: ``["3x3_MBConv3", "zero", "7x7_MBConv6", ...]``. A derived-architecture file is JSON with
at least ``{"space": {"name": ..., <constructor args>}, "ops": [...]}``; the search adds the
probabilities and the expected cost (see :func:`derived_arch_record`).

Module naming contract: every :class:`~lightning_nas.spaces.layers.LayerSpec` from
:meth:`ProxylessSpace.layer_specs` is named after its convolution / linear module in the derived
standalone network (:class:`lightning_nas.nn.proxyless_net.ProxylessNet`)::

    stem.conv                                      role stem
    first_block.dw.conv, first_block.project.conv  roles dw, pw_project (block None)
    blocks.{i}.expand.conv                         role pw_expand (absent for expand ratio 1)
    blocks.{i}.dw.conv                             role dw
    blocks.{i}.project.conv                        role pw_project
    feature_mix.conv                               role head
    classifier.linear                              role classifier

``i`` is the searchable layer's index; a ``zero`` layer has no modules and no specs.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.ofa_layout import conv_out as _conv_out
from lightning_nas.spaces.ofa_layout import make_divisible

__all__ = [
    "DEFAULT_CANDIDATES",
    "ZERO",
    "PRESETS",
    "ProxylessSpace",
    "SearchLayer",
    "derived_arch_record",
    "expected_cost",
    "load_derived_arch",
    "op_name",
    "parse_op",
    "space_from_record",
]

#: The skip op: the searchable layer is left out (only where the shortcut allows).
ZERO = "zero"
#: The ProxylessNAS candidates: kernel 3/5/7 x expand 3/6, plus the zero op.
DEFAULT_CANDIDATES = [
    "3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6", "7x7_MBConv3", "7x7_MBConv6", ZERO,
]

_OP_PATTERN = re.compile(r"^(\d+)x(\d+)_MBConv(\d+)$")


def op_name(kernel: int, expand: int) -> str:
    """``(5, 6) -> "5x5_MBConv6"``."""
    return f"{kernel}x{kernel}_MBConv{expand}"


def parse_op(name: str) -> tuple[int, int] | None:
    """``"5x5_MBConv6" -> (5, 6)``, ``"zero" -> None``; a malformed name raises ValueError."""
    if name == ZERO:
        return None
    match = _OP_PATTERN.match(str(name))
    if match is None:
        raise ValueError(f"unknown op {name!r}; ops are 'KxK_MBConvE' (e.g. '3x3_MBConv6') or 'zero'")
    k1, k2, expand = (int(g) for g in match.groups())
    if k1 != k2 or k1 % 2 == 0 or k1 < 1:
        raise ValueError(f"op {name!r}: the depthwise kernel must be square and odd (e.g. '5x5_MBConv3')")
    if expand < 1:
        raise ValueError(f"op {name!r}: the expand ratio must be >= 1")
    return k1, expand


@dataclass(frozen=True)
class SearchLayer:
    """Static facts about one searchable layer."""

    index: int
    stage: int
    position: int
    in_channels: int
    out_channels: int
    stride: int
    #: The ops this layer may choose (``candidate_ops`` minus ``zero`` where there is no shortcut).
    candidates: tuple[str, ...]

    @property
    def shortcut(self) -> bool:
        """Whether the layer has an identity shortcut (and so may be the zero op)."""
        return self.stride == 1 and self.in_channels == self.out_channels

    def describe(self) -> str:
        shortcut = "shortcut" if self.shortcut else "no shortcut"
        return (f"layer {self.index} (stage {self.stage}, stride {self.stride}, "
                f"{self.in_channels}->{self.out_channels} channels, {shortcut})")


#: Named argument sets of :class:`ProxylessSpace`, by registry name (variants are data, not subclasses).
PRESETS: dict[str, dict[str, Any]] = {
    "proxyless": {},
    # The MobileNetV2-for-CIFAR convention: the stem and the first stage keep the resolution so the
    # last stages still see 4x4 maps.
    "proxyless_cifar": {"num_classes": 10, "resolution": 32, "stage_strides": [1, 2, 2, 1, 2, 1], "stem_stride": 1},
}


class ProxylessSpace:
    """ProxylessNAS space on the MobileNetV2 layout (ImageNet defaults: 224x224, 21 searchable layers).

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (widths rounded to multiples of 8); the feature-mix width
            only grows with it, as in MobileNetV2.
        resolution: the input size the cost tables and layer specs use by default.
        candidate_ops: the op vocabulary of every searchable layer (see the module docstring);
            ``zero`` is dropped at layers without shortcut.
        stage_widths: output channels of each stage (before ``width_mult``).
        stage_depths: number of searchable layers of each stage.
        stage_strides: stride of the first layer of each stage.
        stem_channels: output channels of the stem convolution.
        stem_stride: stride of the stem.
        first_block_channels: output channels of the fixed first MBConv (expand 1, 3x3).
        feature_channels: channels of the 1x1 feature-mix layer before pooling.
        dropout: dropout before the classifier.
        bn_momentum: batch-norm momentum (PyTorch convention).
        bn_eps: batch-norm epsilon.
    """

    #: Registry name of the space; :meth:`from_preset` sets the preset's name on the instance.
    name: str = "proxyless"

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolution: int = 224,
        candidate_ops: list[str] = ["3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6", "7x7_MBConv3", "7x7_MBConv6", "zero"],  # noqa: B006, E501 - copied, never mutated
        stage_widths: list[int] = [24, 40, 80, 96, 192, 320],  # noqa: B006
        stage_depths: list[int] = [4, 4, 4, 4, 4, 1],  # noqa: B006
        stage_strides: list[int] = [2, 2, 2, 1, 2, 1],  # noqa: B006
        stem_channels: int = 32,
        stem_stride: int = 2,
        first_block_channels: int = 16,
        feature_channels: int = 1280,
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-3,
    ) -> None:
        self._hparams: dict[str, Any] = {
            "num_classes": int(num_classes),
            "width_mult": float(width_mult),
            "resolution": int(resolution),
            "candidate_ops": [str(op) for op in candidate_ops],
            "stage_widths": [int(w) for w in stage_widths],
            "stage_depths": [int(d) for d in stage_depths],
            "stage_strides": [int(s) for s in stage_strides],
            "stem_channels": int(stem_channels),
            "stem_stride": int(stem_stride),
            "first_block_channels": int(first_block_channels),
            "feature_channels": int(feature_channels),
            "dropout": float(dropout),
            "bn_momentum": float(bn_momentum),
            "bn_eps": float(bn_eps),
        }
        h = self._hparams
        self.num_classes: int = h["num_classes"]
        self.width_mult: float = h["width_mult"]
        self.resolution: int = h["resolution"]
        self.candidate_ops: list[str] = list(h["candidate_ops"])
        self.stage_widths: list[int] = list(h["stage_widths"])
        self.stage_depths: list[int] = list(h["stage_depths"])
        self.stage_strides: list[int] = list(h["stage_strides"])
        self.stem_stride: int = h["stem_stride"]
        self.dropout: float = h["dropout"]
        self.bn_momentum: float = h["bn_momentum"]
        self.bn_eps: float = h["bn_eps"]
        self._check()
        self.stem_channels = make_divisible(h["stem_channels"] * self.width_mult)
        self.first_block_channels = make_divisible(h["first_block_channels"] * self.width_mult)
        self.widths = [make_divisible(w * self.width_mult) for w in self.stage_widths]
        self.feature_channels = (make_divisible(h["feature_channels"] * self.width_mult)
                                 if self.width_mult > 1.0 else h["feature_channels"])
        self.layers = self._search_layers()
        self.num_layers = len(self.layers)

    # ------------------------------------------------------------------ layout

    def _check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_classes > 0, f"num_classes must be positive, got {self.num_classes}")
        need(self.width_mult > 0, f"width_mult must be positive, got {self.width_mult}")
        need(self.resolution > 0, f"resolution must be positive, got {self.resolution}")
        need(bool(self.candidate_ops), "candidate_ops must not be empty")
        for op in self.candidate_ops:
            parse_op(op)  # raises with the op's name
        duplicates = sorted({op for op in self.candidate_ops if self.candidate_ops.count(op) > 1})
        need(not duplicates, f"candidate_ops lists {duplicates} more than once")
        need(any(op != ZERO for op in self.candidate_ops),
             "candidate_ops needs at least one MBConv op: 'zero' is only allowed where a shortcut exists")
        stages = len(self.stage_widths)
        need(stages > 0, "stage_widths must not be empty")
        for key in ("stage_depths", "stage_strides"):
            need(len(getattr(self, key)) == stages,
                 f"{key} has {len(getattr(self, key))} entries but stage_widths has {stages}")
        need(all(w > 0 for w in self.stage_widths), f"stage_widths must be positive, got {self.stage_widths}")
        need(all(d >= 1 for d in self.stage_depths), f"stage_depths must be >= 1, got {self.stage_depths}")
        need(all(s in (1, 2) for s in self.stage_strides), f"stage_strides must be 1 or 2, got {self.stage_strides}")
        need(self.stem_stride in (1, 2), f"stem_stride must be 1 or 2, got {self.stem_stride}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    def _search_layers(self) -> list[SearchLayer]:
        layers = []
        in_channels = self.first_block_channels
        for stage, (width, depth, stride) in enumerate(zip(self.widths, self.stage_depths, self.stage_strides)):
            for position in range(depth):
                layer_stride = stride if position == 0 else 1
                shortcut = layer_stride == 1 and in_channels == width
                candidates = tuple(op for op in self.candidate_ops if shortcut or op != ZERO)
                layers.append(SearchLayer(len(layers), stage, position, in_channels, width, layer_stride, candidates))
                in_channels = width
        return layers

    @classmethod
    def from_preset(cls, preset: str, **arguments: Any) -> ProxylessSpace:
        """The space of a named preset of :data:`PRESETS`; ``arguments`` override the preset's."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} of {cls.__name__}; presets: {sorted(PRESETS)}")
        space = cls(**{**PRESETS[preset], **arguments})
        space.name = preset
        return space

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this space."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._hparams.items()}

    def mid_channels(self, in_channels: int, expand: int) -> int:
        """Hidden channels of an MBConv with ``expand`` on ``in_channels`` (rounded to multiples of 8)."""
        return in_channels if expand == 1 else make_divisible(round(in_channels * expand))

    def input_sizes(self, resolution: int | None = None) -> list[int]:
        """Spatial input size of every searchable layer."""
        size = _conv_out(self.resolution if resolution is None else int(resolution), 3, self.stem_stride)
        sizes = []
        for layer in self.layers:
            sizes.append(size)
            size = _conv_out(size, 3, layer.stride)
        return sizes

    def final_size(self, resolution: int | None = None) -> int:
        sizes = self.input_sizes(resolution)
        return _conv_out(sizes[-1], 3, self.layers[-1].stride)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.hparams() == self.hparams()

    def __hash__(self) -> int:
        return hash(repr(self))

    # ------------------------------------------------------------------ architectures

    def validate(self, arch: Sequence[str] | Mapping[str, Any]) -> list[str]:
        """Check an architecture (op names per searchable layer, or ``{"ops": [...]}``); returns a copy.

        Raises:
            ValueError: naming the layer, the bad op and the layer's allowed ops.
        """
        if isinstance(arch, Mapping):
            if "ops" not in arch:
                raise ValueError(f"an architecture mapping needs an 'ops' list, got keys {sorted(arch)}")
            arch = arch["ops"]
        if isinstance(arch, (str, bytes)) or not isinstance(arch, Sequence):
            raise ValueError(f"an architecture is a list of {self.num_layers} op names, got {arch!r}")
        if len(arch) != self.num_layers:
            raise ValueError(f"the architecture has {len(arch)} ops but the space has {self.num_layers} "
                             f"searchable layers (stage_depths {self.stage_depths})")
        for layer, op in zip(self.layers, arch):
            if op not in layer.candidates:
                why = " ('zero' needs a shortcut)" if op == ZERO else ""
                raise ValueError(f"{layer.describe()}: op {op!r} is not a candidate{why}; "
                                 f"allowed: {list(layer.candidates)}")
        return [str(op) for op in arch]

    def sample(self, rng: random.Random) -> list[str]:
        """A uniformly random architecture."""
        return [rng.choice(layer.candidates) for layer in self.layers]

    def canonical(self, arch: Sequence[str] | Mapping[str, Any]) -> list[str]:
        """The validated op list: every op list is its own canonical form (a ``zero`` layer has no
        other choices to normalise)."""
        return self.validate(arch)

    def config_key(self, arch: Sequence[str] | Mapping[str, Any]) -> tuple[str, ...]:
        """A hashable identity of the architecture."""
        return tuple(self.validate(arch))

    def mutate(self, arch: Sequence[str] | Mapping[str, Any], rng: random.Random, prob: float = 0.1) -> list[str]:
        """Each layer's op redrawn from its candidates with probability ``prob``."""
        ops = self.validate(arch)
        return [rng.choice(layer.candidates) if rng.random() < prob else op for layer, op in zip(self.layers, ops)]

    def crossover(self, first: Sequence[str] | Mapping[str, Any], second: Sequence[str] | Mapping[str, Any],
                  rng: random.Random) -> list[str]:
        """Uniform crossover: every layer's op comes from either parent with equal probability."""
        a, b = self.validate(first), self.validate(second)
        return [x if rng.random() < 0.5 else y for x, y in zip(a, b)]

    @property
    def encoding_size(self) -> int:
        """Length of :meth:`encode`'s vector: one slot per candidate of every layer."""
        return sum(len(layer.candidates) for layer in self.layers)

    def encode(self, arch: Sequence[str] | Mapping[str, Any]) -> list[float]:
        """Per searchable layer, a one-hot over that layer's candidates (layers without shortcut
        have no ``zero`` slot)."""
        ops = self.validate(arch)
        vec: list[float] = []
        for layer, op in zip(self.layers, ops):
            one_hot = [0.0] * len(layer.candidates)
            one_hot[layer.candidates.index(op)] = 1.0
            vec += one_hot
        return vec

    def decode(self, vector: Sequence[float]) -> list[str]:
        """Inverse of :meth:`encode`."""
        if len(vector) != self.encoding_size:
            raise ValueError(f"encoding must have {self.encoding_size} entries, got {len(vector)}")
        ops, offset = [], 0
        for layer in self.layers:
            chunk = vector[offset : offset + len(layer.candidates)]
            hot = [i for i, v in enumerate(chunk) if v > 0.5]
            if len(hot) != 1:
                raise ValueError(f"encoding of {layer.describe()} is not one-hot: {list(chunk)}")
            ops.append(layer.candidates[hot[0]])
            offset += len(layer.candidates)
        return ops

    def uniform_op(self, op: str) -> list[str]:
        """Every layer runs ``op`` (e.g. the MobileNetV2-like ``3x3_MBConv6``)."""
        return self.validate([op] * self.num_layers)

    # ------------------------------------------------------------------ layer specs and costs

    @staticmethod
    def _spec(specs: list[LayerSpec], name: str, cin: int, cout: int, k: int, stride: int, groups: int,
              in_size: int, role: str, block: int | None, op: str = "conv", bias: bool = False) -> int:
        out_size = _conv_out(in_size, k, stride)
        specs.append(LayerSpec(name=name, op=op, in_channels=cin, out_channels=cout, kernel_size=k, stride=stride,
                               groups=groups, in_size=in_size, out_size=out_size, bias=bias, role=role, block=block))
        return out_size

    def stem_layer_specs(self, resolution: int | None = None) -> list[LayerSpec]:
        """Stem and the fixed first block."""
        specs: list[LayerSpec] = []
        size = self.resolution if resolution is None else int(resolution)
        size = self._spec(specs, "stem.conv", 3, self.stem_channels, 3, self.stem_stride, 1, size, "stem", None)
        c = self.stem_channels
        size = self._spec(specs, "first_block.dw.conv", c, c, 3, 1, c, size, "dw", None)
        self._spec(specs, "first_block.project.conv", c, self.first_block_channels, 1, 1, 1, size, "pw_project", None)
        return specs

    def head_layer_specs(self, resolution: int | None = None) -> list[LayerSpec]:
        """Feature mix and classifier."""
        specs: list[LayerSpec] = []
        size = self.final_size(resolution)
        self._spec(specs, "feature_mix.conv", self.widths[-1], self.feature_channels, 1, 1, 1, size, "head", None)
        self._spec(specs, "classifier.linear", self.feature_channels, self.num_classes, 1, 1, 1, 1, "classifier",
                   None, op="linear", bias=True)
        return specs

    def fixed_layer_specs(self, resolution: int | None = None) -> list[LayerSpec]:
        """The layers every architecture has (stem, first block, feature mix, classifier)."""
        return self.stem_layer_specs(resolution) + self.head_layer_specs(resolution)

    def candidate_layer_specs(self, layer: int, op: str, resolution: int | None = None) -> list[LayerSpec]:
        """The layers of ``op`` at searchable layer ``layer`` (empty for ``zero``)."""
        spec = self.layers[layer]
        if op not in spec.candidates:
            raise ValueError(f"{spec.describe()}: op {op!r} is not a candidate; allowed: {list(spec.candidates)}")
        parsed = parse_op(op)
        if parsed is None:
            return []
        kernel, expand = parsed
        size = self.input_sizes(resolution)[layer]
        mid = self.mid_channels(spec.in_channels, expand)
        specs: list[LayerSpec] = []
        p = f"blocks.{layer}"
        if expand != 1:
            self._spec(specs, f"{p}.expand.conv", spec.in_channels, mid, 1, 1, 1, size, "pw_expand", layer)
        out = self._spec(specs, f"{p}.dw.conv", mid, mid, kernel, spec.stride, mid, size, "dw", layer)
        self._spec(specs, f"{p}.project.conv", mid, spec.out_channels, 1, 1, 1, out, "pw_project", layer)
        return specs

    def layer_specs(self, arch: Sequence[str] | Mapping[str, Any], resolution: int | None = None) -> list[LayerSpec]:
        """Every convolution / linear layer of the derived network, in execution order."""
        ops = self.validate(arch)
        specs = self.stem_layer_specs(resolution)
        for i, op in enumerate(ops):
            specs += self.candidate_layer_specs(i, op, resolution)
        return specs + self.head_layer_specs(resolution)

    def batchnorm_channels(self, arch: Sequence[str] | Mapping[str, Any]) -> list[int]:
        """Channels of every batch norm of the derived network (one per conv; none on the classifier)."""
        return [s.out_channels for s in self.layer_specs(arch) if s.op == "conv"]

    def macs(self, arch: Sequence[str] | Mapping[str, Any], resolution: int | None = None) -> int:
        """Multiply-accumulates of one image (convolutions and linear layers)."""
        return sum(s.macs for s in self.layer_specs(arch, resolution))

    def params(self, arch: Sequence[str] | Mapping[str, Any]) -> int:
        """Trainable parameters: conv / linear weights and biases plus batch-norm affine parameters."""
        return sum(s.params for s in self.layer_specs(arch)) + 2 * sum(self.batchnorm_channels(arch))

    def candidate_costs(self, layer_cost: Callable[[list[LayerSpec]], float],
                        resolution: int | None = None) -> list[list[float]]:
        """``costs[l][j]``: cost of candidate ``j`` of searchable layer ``l`` by any cost model of layer specs.

        ``layer_cost`` maps the specs of one op to its cost (``sum(s.macs ...)``, an accelerator
        model, a shape-keyed lookup table); the zero op costs ``layer_cost([])``.
        """
        return [[float(layer_cost(self.candidate_layer_specs(i, op, resolution))) for op in layer.candidates]
                for i, layer in enumerate(self.layers)]

    def fixed_cost(self, layer_cost: Callable[[list[LayerSpec]], float], resolution: int | None = None) -> float:
        """Cost of the layers every architecture has, by the same cost model."""
        return float(layer_cost(self.fixed_layer_specs(resolution)))


def expected_cost(probabilities: Sequence[Sequence[float]], costs: Sequence[Sequence[float]],
                  fixed: float = 0.0) -> float:
    """``fixed + sum_l sum_j p[l][j] * cost[l][j]``: the expected cost of a sampled architecture."""
    if len(probabilities) != len(costs):
        raise ValueError(f"{len(probabilities)} probability rows for {len(costs)} cost rows")
    total = float(fixed)
    for layer, (p_row, c_row) in enumerate(zip(probabilities, costs)):
        if len(p_row) != len(c_row):
            raise ValueError(f"layer {layer}: {len(p_row)} probabilities for {len(c_row)} costs")
        total += sum(float(p) * float(c) for p, c in zip(p_row, c_row))
    return total


# ---------------------------------------------------------------------- derived architecture files

def derived_arch_record(space: ProxylessSpace, ops: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The JSON record of a derived architecture: the space that rebuilds it, its ops, and ``extra``."""
    ops = space.validate(ops)
    return {"space": {"name": space.name, **space.hparams()}, "ops": ops, "num_layers": space.num_layers,
            "macs": space.macs(ops), "params": space.params(ops), **extra}


def space_from_record(record: Mapping[str, Any], num_classes: int | None = None) -> ProxylessSpace:
    """Rebuild the space of a derived-architecture record (optionally for another class count)."""
    if "space" not in record or not isinstance(record["space"], Mapping):
        raise ValueError("a derived architecture record needs a 'space' mapping with the space's name and arguments")
    arguments = dict(record["space"])
    name = arguments.pop("name", None)
    if name not in PRESETS:
        raise ValueError(f"derived architecture names space {name!r}; known: {sorted(PRESETS)}")
    if num_classes is not None:
        arguments["num_classes"] = int(num_classes)
    return ProxylessSpace.from_preset(name, **arguments)


def load_derived_arch(path: str | Path, num_classes: int | None = None) -> tuple[ProxylessSpace, list[str]]:
    """(space, ops) of a ``derived_arch.json``; the ops are validated against the space."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no derived architecture file at {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    space = space_from_record(record, num_classes)
    if "ops" not in record:
        raise ValueError(f"{path} has no 'ops' list")
    return space, space.validate(record["ops"])
