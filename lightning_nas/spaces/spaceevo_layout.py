"""The SpaceEvo space of spaces for CIFAR-10, described without torch.

SpaceEvo (microsoft/Moonlit) searches the search space itself. A *space* (:class:`SpaceChoice`)
picks, for every searchable stage of a fixed macro layout (:class:`MacroLayout`), a block type
(:data:`BLOCK_TYPES`) and a *width window*: a contiguous slice ``[start, stop)`` of that stage's
width list, of :data:`MIN_WINDOW` to :data:`MAX_WINDOW` widths. The subnets of a space are then,
per stage, one *sub-stage* (:class:`SubStage`: width inside the window, depth, kernel and expand
ratio of the stage's block type; one kernel and one expand ratio for all blocks of the sub-stage).

This module is the single source of truth for that layout: the elastic stages and supernets
(:mod:`lightning_nas.nn`), the block-wise distillation tables and the space search
(:mod:`lightning_nas.search.spaceevo`) read block types, widths, windows and sub-stages from here.
Block structures are fixed by :func:`block_layers` (every convolution / linear layer of one
block, as :class:`~lightning_nas.spaces.layers.LayerSpec`); the network code must build exactly
those layers, so MAC counts agree everywhere. Torch-free and numpy-free.

String ids (``"mbconv_se[1:4]-bottleneck[0:3]-..."``, one ``name[start:stop]`` per stage) and
integer vectors (``[block index, start, stop]`` per stage) both round-trip through
:func:`space_id` / :func:`parse_space_id` and :func:`encode` / :func:`decode`.

Random functions take a ``random.Random`` or a ``numpy.random.Generator`` (the space search uses
the latter); the same seed gives the same spaces.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_nas.errors import RecipeError
from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.ofa_layout import conv_out, make_divisible

__all__ = [
    "BLOCK_TYPES",
    "CIFAR_LAYOUT",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "BlockType",
    "HeadSpec",
    "MacroLayout",
    "SpaceChoice",
    "StageChoice",
    "StageSpec",
    "StemSpec",
    "SubStage",
    "block_layers",
    "decode",
    "default_window",
    "encode",
    "extreme_substages",
    "homogeneous_spaces",
    "mid_channels",
    "mutate_block_type",
    "mutate_window",
    "parse_space_id",
    "random_space",
    "se_channels",
    "space_id",
    "stage_windows",
    "subnet_layers",
    "subnet_macs",
    "substage_layers",
    "substage_choices",
    "validate",
]

#: Fewest and most widths of a window. The reference allows 2 to 7; on the CIFAR layout's six
#: widths per stage a window of 4 still spans 2-3x in channels, and capping it keeps windows
#: (12 per stage) a real choice rather than "take everything".
MIN_WINDOW = 2
MAX_WINDOW = 4

#: Activation names a block type may use (``relu6`` is MobileNetV2's clipped ReLU).
ACTIVATIONS = ("relu", "relu6", "h_swish")

#: Squeeze-excite reduction (as in MobileNetV3 and the once-for-all space).
SE_REDUCTION = 4


@dataclass(frozen=True)
class BlockType:
    """One block family a stage may be made of, with its elastic choices.

    ``expands`` are ratios of the block's input channels (MBConv, fused MBConv) or of its output
    channels (bottleneck); see :func:`block_layers` for the exact structure of each family.
    """

    name: str
    kernels: tuple[int, ...]
    expands: tuple[float, ...]
    depths: tuple[int, ...]
    se: bool
    activation: str
    description: str


def _block_type(name: str, kernels: tuple[int, ...], expands: tuple[float, ...], depths: tuple[int, ...],
                se: bool, activation: str, description: str) -> tuple[str, BlockType]:
    return name, BlockType(name, kernels, expands, depths, se, activation, description)


#: Block types by name, in encoding order (the index in this mapping is the vector encoding).
#: Expand ratios are smaller than the reference's ImageNet 4/6/8 (MBConv) and 0.5/1/1.5
#: (bottleneck): at 32 px the stages hold up to 320 channels, and ratio 8 or 1.5 puts the largest
#: subnets past 100M MACs, far above the once-for-all CIFAR space (49.6M) they are compared with.
#: Depths are CIFAR-scale (the reference's 2-8 is for 224 px, 6 stages); the full convolutions
#: of bottleneck and fused MBConv blocks cost ~9-25x a depthwise one, so they get one block less.
BLOCK_TYPES: dict[str, BlockType] = dict([
    _block_type("dual_dw", (3, 5), (1,), (2, 3, 4), False, "relu",
                "MobileNetV1-style dual depthwise block: dw kxk (stride) + pw 1x1 to the width, "
                "dw kxk + pw 1x1, identity shortcut when shapes allow"),
    _block_type("mbconv", (3, 5), (4, 6), (2, 3, 4), False, "relu6",
                "MobileNetV2 inverted residual: pw expand, dw kxk (stride), pw project, ReLU6"),
    _block_type("mbconv_se", (3, 5), (4, 6), (2, 3, 4), True, "h_swish",
                "MobileNetV3 inverted residual: pw expand, dw kxk (stride), squeeze-excite, "
                "pw project, h-swish"),
    _block_type("bottleneck", (3, 5), (0.5, 1.0), (1, 2, 3), False, "relu",
                "ResNet bottleneck: pw to width*expand, full kxk conv (stride), pw to width, "
                "1x1 projection shortcut when shapes change, ReLU after the sum"),
    _block_type("fused_mbconv", (3,), (2, 4), (1, 2, 3), False, "relu6",
                "EfficientNetV2 fused MBConv: full kxk conv expand (stride), pw project, ReLU6"),
    _block_type("fused_mbconv_se", (3,), (2, 4), (1, 2, 3), True, "h_swish",
                "fused MBConv with squeeze-excite after the kxk conv, h-swish"),
])


@dataclass(frozen=True)
class StemSpec:
    """Fixed first convolution (kxk, BN, activation)."""

    channels: int
    kernel: int = 3
    stride: int = 1
    activation: str = "h_swish"


@dataclass(frozen=True)
class StageSpec:
    """One searchable stage: the stride of its first block and its candidate widths (ascending)."""

    stride: int
    widths: tuple[int, ...]


@dataclass(frozen=True)
class HeadSpec:
    """Fixed head: 1x1 conv to ``channels`` (BN, activation), global pooling, dropout, linear."""

    channels: int
    activation: str = "h_swish"
    dropout: float = 0.1


@dataclass(frozen=True)
class MacroLayout:
    """The fixed skeleton every space of the search shares."""

    name: str
    resolution: int
    num_classes: int
    stem: StemSpec
    stages: tuple[StageSpec, ...]
    head: HeadSpec
    #: Block types a stage may use, in encoding order.
    block_types: tuple[str, ...] = field(default_factory=lambda: tuple(BLOCK_TYPES))
    in_channels: int = 3

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_sizes(self) -> list[int]:
        """Input feature-map size of every stage (square)."""
        size = conv_out(self.resolution, self.stem.kernel, self.stem.stride)
        sizes = []
        for stage in self.stages:
            sizes.append(size)
            size = conv_out(size, 3, stage.stride)
        return sizes


#: The 32 px layout. Stem stride 1 and stage strides 2, 2, 2, 1, 2 as in the once-for-all CIFAR
#: space (maps of 16, 8, 4, 4, 2 px), so the evolved space and that baseline see the same
#: resolutions. Six widths per stage (multiples of 8 but the first stage's, where 4-channel steps
#: keep the 16 px stage cheap) reaching 1.3-1.4x the once-for-all widths (24, 40, 80, 112, 160).
#: Largest subnets (top window, deepest, largest kernel and expand ratio): 13M MACs (dual_dw) to
#: 65M (mbconv), 94M (bottleneck) and 115M (fused MBConv, whose full 3x3 expand convolutions are
#: the price of its int8 speed); smallest subnets 1.6-5.6M (the once-for-all CIFAR space spans
#: 7.6-49.6M). tests/spaces/test_spaceevo_layout.py pins these figures.
CIFAR_LAYOUT = MacroLayout(
    name="spaceevo_cifar",
    resolution=32,
    num_classes=10,
    stem=StemSpec(channels=24, kernel=3, stride=1),
    stages=(
        StageSpec(2, (8, 12, 16, 20, 24, 32)),
        StageSpec(2, (16, 24, 32, 40, 48, 56)),
        StageSpec(2, (40, 48, 64, 80, 96, 112)),
        StageSpec(1, (48, 64, 80, 96, 112, 128)),
        StageSpec(2, (80, 96, 128, 160, 192, 224)),
    ),
    head=HeadSpec(channels=640),
)


@dataclass(frozen=True)
class SubStage:
    """One sub-stage of an elastic stage: output width, number of blocks, kernel, expand ratio."""

    width: int
    depth: int
    kernel: int
    expand: float


@dataclass(frozen=True)
class StageChoice:
    """A stage of a space: its block type and its width window ``[start, stop)``."""

    block_type: str
    window: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.block_type}[{self.window[0]}:{self.window[1]}]"


@dataclass(frozen=True)
class SpaceChoice:
    """One point of the space of spaces: a :class:`StageChoice` per stage (hashable)."""

    stages: tuple[StageChoice, ...]

    @property
    def id(self) -> str:
        return space_id(self)

    def __str__(self) -> str:
        return self.id


# ---------------------------------------------------------------------------------------------
# validation, ids and vectors

def _allowed_windows(layout: MacroLayout, stage: int) -> str:
    n = len(layout.stages[stage].widths)
    return (f"[start:stop] with 0 <= start < stop <= {n} and {MIN_WINDOW} <= stop - start <= "
            f"{MAX_WINDOW} (widths {list(layout.stages[stage].widths)})")


def _check_window(layout: MacroLayout, stage: int, window: Any) -> tuple[int, int]:
    key = f"stages[{stage}].window"
    try:
        start, stop = (int(v) for v in window)
        if (start, stop) != tuple(window):
            raise ValueError
    except (TypeError, ValueError):
        raise RecipeError("a window is two integers [start, stop)", key=key, given=window,
                          allowed=_allowed_windows(layout, stage)) from None
    n = len(layout.stages[stage].widths)
    if not (0 <= start < stop <= n and MIN_WINDOW <= stop - start <= MAX_WINDOW):
        raise RecipeError(f"window outside stage {stage}'s width list or of the wrong length", key=key,
                          given=[start, stop], allowed=_allowed_windows(layout, stage))
    return start, stop


def _check_block_type(layout: MacroLayout, key: str, name: Any) -> str:
    if name not in layout.block_types:
        raise RecipeError("unknown block type", key=key, given=name, allowed=layout.block_types)
    return str(name)


def validate(choice: Any, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """A :class:`SpaceChoice` of ``layout`` from a choice, a string id, or a list of per-stage
    ``{"block_type": ..., "window": [start, stop]}`` mappings / ``(block_type, window)`` pairs;
    :class:`~lightning_nas.errors.RecipeError` naming the stage key and what is allowed otherwise."""
    if isinstance(choice, str):
        return parse_space_id(choice, layout)
    stages = choice.stages if isinstance(choice, SpaceChoice) else choice
    if not isinstance(stages, Sequence) or isinstance(stages, str):
        raise RecipeError("a space is a list of stages (block type and window each)", key="stages",
                          given=choice, allowed=f"{layout.num_stages} stages")
    if len(stages) != layout.num_stages:
        raise RecipeError("wrong number of stages", key="stages", given=len(stages),
                          allowed=f"{layout.num_stages} stages")
    out = []
    for index, stage in enumerate(stages):
        if isinstance(stage, StageChoice):
            name, window = stage.block_type, stage.window
        elif isinstance(stage, dict):
            unknown = set(stage) - {"block_type", "window"}
            if unknown or len(stage) != 2:
                raise RecipeError("a stage has exactly the keys block_type and window", key=f"stages[{index}]",
                                  given=sorted(stage), allowed="block_type, window")
            name, window = stage["block_type"], stage["window"]
        else:
            try:
                name, window = stage
            except (TypeError, ValueError):
                raise RecipeError("a stage is a block type and a window", key=f"stages[{index}]", given=stage,
                                  allowed="(block_type, [start, stop])") from None
        name = _check_block_type(layout, f"stages[{index}].block_type", name)
        out.append(StageChoice(name, _check_window(layout, index, window)))
    return SpaceChoice(tuple(out))


def space_id(choice: SpaceChoice) -> str:
    """The short string id, ``name[start:stop]`` per stage joined by ``-``."""
    return "-".join(stage.label for stage in choice.stages)


_STAGE_ID = re.compile(r"([a-z0-9_]+)\[(\d+):(\d+)\]")


def parse_space_id(text: str, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """Inverse of :func:`space_id` (validated against ``layout``)."""
    parts = text.split("-") if isinstance(text, str) else []
    matches = [_STAGE_ID.fullmatch(part) for part in parts]
    if not parts or not all(matches):
        raise RecipeError("not a space id", key="space", given=text,
                          allowed="block_type[start:stop] per stage joined by '-', e.g. "
                          + "-".join(f"mbconv[0:{MIN_WINDOW}]" for _ in layout.stages))
    stages = [(m.group(1), (int(m.group(2)), int(m.group(3)))) for m in matches]  # type: ignore[union-attr]
    return validate(stages, layout)


def encode(choice: Any, layout: MacroLayout = CIFAR_LAYOUT) -> list[int]:
    """``[block type index, start, stop]`` per stage (``3 * num_stages`` integers)."""
    choice = validate(choice, layout)
    vector = []
    for stage in choice.stages:
        vector.extend((layout.block_types.index(stage.block_type), *stage.window))
    return vector


def decode(vector: Sequence[int], layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """Inverse of :func:`encode`."""
    values = list(vector)
    if len(values) != 3 * layout.num_stages or any(int(v) != v for v in values):
        raise RecipeError("a space vector is 3 integers per stage", key="vector", given=values,
                          allowed=f"{3 * layout.num_stages} integers [block index, start, stop] per stage")
    stages = []
    for index in range(layout.num_stages):
        block, start, stop = (int(v) for v in values[3 * index: 3 * index + 3])
        if not 0 <= block < len(layout.block_types):
            raise RecipeError("block type index out of range", key=f"vector[{3 * index}]", given=block,
                              allowed=f"0..{len(layout.block_types) - 1} ({', '.join(layout.block_types)})")
        stages.append((layout.block_types[block], (start, stop)))
    return validate(stages, layout)


# ---------------------------------------------------------------------------------------------
# seeds, sampling, mutation

def _below(rng: Any, n: int) -> int:
    """A uniform integer in ``[0, n)`` from a ``random.Random`` or a ``numpy.random.Generator``."""
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    return int(rng.integers(n))


def stage_windows(stage_index: int, layout: MacroLayout = CIFAR_LAYOUT) -> list[tuple[int, int]]:
    """Every valid window of a stage, by start then stop."""
    n = len(layout.stages[stage_index].widths)
    return [(start, stop) for start in range(n)
            for stop in range(start + MIN_WINDOW, min(n, start + MAX_WINDOW) + 1)]


def default_window(stage_index: int, layout: MacroLayout = CIFAR_LAYOUT) -> tuple[int, int]:
    """The widest window (:data:`MAX_WINDOW` widths) centred in the stage's width list (lower
    middle when it cannot be centred): homogeneous seeds start neither at the smallest nor at the
    largest networks and the evolution moves the windows from there."""
    n = len(layout.stages[stage_index].widths)
    length = min(MAX_WINDOW, n)
    start = (n - length) // 2
    return start, start + length


def homogeneous_spaces(layout: MacroLayout = CIFAR_LAYOUT) -> list[SpaceChoice]:
    """One space per block type, that type on every stage with :func:`default_window`."""
    return [SpaceChoice(tuple(StageChoice(name, default_window(i, layout)) for i in range(layout.num_stages)))
            for name in layout.block_types]


def random_space(rng: Any, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """Per stage a block type drawn uniformly from all of ``layout.block_types`` and a window
    drawn uniformly from :func:`stage_windows`."""
    stages = []
    for index in range(layout.num_stages):
        windows = stage_windows(index, layout)
        stages.append(StageChoice(layout.block_types[_below(rng, len(layout.block_types))],
                                  windows[_below(rng, len(windows))]))
    return SpaceChoice(tuple(stages))


def _replace_stage(choice: SpaceChoice, index: int, stage: StageChoice) -> SpaceChoice:
    stages = list(choice.stages)
    stages[index] = stage
    return SpaceChoice(tuple(stages))


def mutate_block_type(choice: Any, rng: Any, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """``choice`` with one uniformly drawn stage given another block type (uniform among the
    others); its window is kept."""
    choice = validate(choice, layout)
    if len(layout.block_types) < 2:
        raise RecipeError("a block type mutation needs two block types", key="block_types",
                          given=list(layout.block_types), allowed="at least 2 names")
    index = _below(rng, layout.num_stages)
    stage = choice.stages[index]
    others = [name for name in layout.block_types if name != stage.block_type]
    return _replace_stage(choice, index, StageChoice(others[_below(rng, len(others))], stage.window))


def mutate_window(choice: Any, rng: Any, layout: MacroLayout = CIFAR_LAYOUT) -> SpaceChoice:
    """``choice`` with one uniformly drawn stage given another window (uniform among the stage's
    other valid windows); its block type is kept."""
    choice = validate(choice, layout)
    index = _below(rng, layout.num_stages)
    stage = choice.stages[index]
    others = [w for w in stage_windows(index, layout) if w != stage.window]
    return _replace_stage(choice, index, StageChoice(stage.block_type, others[_below(rng, len(others))]))


# ---------------------------------------------------------------------------------------------
# sub-stages and their layers

def substage_choices(stage_index: int, block_type: str, window: tuple[int, int] | None = None,
                     layout: MacroLayout = CIFAR_LAYOUT) -> list[SubStage]:
    """Every sub-stage of the cell (stage, block type) whose width lies in ``window`` (``None``:
    the stage's whole width list, as the block-wise distillation trains it), ordered by width,
    depth, kernel, expand."""
    if not 0 <= stage_index < layout.num_stages:
        raise RecipeError("stage index out of range", key="stage", given=stage_index,
                          allowed=f"0..{layout.num_stages - 1}")
    spec = BLOCK_TYPES[_check_block_type(layout, "block_type", block_type)]
    widths = layout.stages[stage_index].widths
    if window is not None:
        start, stop = _check_window(layout, stage_index, window)
        widths = widths[start:stop]
    return [SubStage(w, d, k, e) for w, d, k, e in itertools.product(widths, spec.depths, spec.kernels, spec.expands)]


def se_channels(channels: int) -> int:
    """Squeeze-excite hidden channels of a block with ``channels`` channels."""
    return make_divisible(channels // SE_REDUCTION)


def mid_channels(block_type: str, in_channels: int, out_channels: int, expand: float) -> int:
    """Hidden channels of a block: ``expand`` times the input (MBConv families) or the output
    (bottleneck), rounded to multiples of 8; the input for the dual depthwise block."""
    if block_type == "dual_dw":
        return in_channels
    base = out_channels if block_type == "bottleneck" else in_channels
    return make_divisible(base * expand)


def block_layers(block_type: str, in_channels: int, out_channels: int, stride: int, kernel: int, expand: float,
                 in_size: int, prefix: str = "") -> list[LayerSpec]:
    """Every convolution of one block, in execution order (named relative to ``prefix``).

    Structures (BN after every conv; ``act`` is the block type's activation)::

        dual_dw          dw1 kxk stride s, act; pw1 1x1 -> out, act; dw2 kxk, act; pw2 1x1, no act
        mbconv(_se)      expand 1x1 -> mid, act; dw kxk stride s, act; [se]; project 1x1 -> out
        bottleneck       reduce 1x1 -> mid, act; conv kxk stride s, act; expand 1x1 -> out;
                         shortcut 1x1 stride s when shapes change; act after the sum
        fused_mbconv(_se) fused kxk stride s -> mid, act; [se]; project 1x1 -> out

    Squeeze-excite: pool, ``se.reduce`` 1x1 -> :func:`se_channels` (bias, ReLU), ``se.expand``
    1x1 (bias, h-sigmoid). Every block but the bottleneck adds an identity shortcut when
    ``stride == 1`` and ``in_channels == out_channels``.
    """
    spec = BLOCK_TYPES[block_type]
    mid = mid_channels(block_type, in_channels, out_channels, expand)
    p = f"{prefix}." if prefix else ""
    specs: list[LayerSpec] = []

    def conv(name: str, cin: int, cout: int, k: int, s: int, groups: int, size: int, role: str,
             bias: bool = False) -> int:
        out = conv_out(size, k, s)
        specs.append(LayerSpec(name=f"{p}{name}", op="conv", in_channels=cin, out_channels=cout, kernel_size=k,
                               stride=s, groups=groups, in_size=size, out_size=out, bias=bias, role=role))
        return out

    def se(channels: int) -> None:
        hidden = se_channels(channels)
        conv("se.reduce", channels, hidden, 1, 1, 1, 1, "se_reduce", bias=True)
        conv("se.expand", hidden, channels, 1, 1, 1, 1, "se_expand", bias=True)

    if block_type == "dual_dw":
        size = conv("dw1.conv", in_channels, in_channels, kernel, stride, in_channels, in_size, "dw")
        conv("pw1.conv", in_channels, out_channels, 1, 1, 1, size, "pw_project")
        conv("dw2.conv", out_channels, out_channels, kernel, 1, out_channels, size, "dw")
        conv("pw2.conv", out_channels, out_channels, 1, 1, 1, size, "pw_project")
    elif block_type in ("mbconv", "mbconv_se"):
        conv("expand.conv", in_channels, mid, 1, 1, 1, in_size, "pw_expand")
        size = conv("dw.conv", mid, mid, kernel, stride, mid, in_size, "dw")
        if spec.se:
            se(mid)
        conv("project.conv", mid, out_channels, 1, 1, 1, size, "pw_project")
    elif block_type == "bottleneck":
        conv("reduce.conv", in_channels, mid, 1, 1, 1, in_size, "pw_expand")
        size = conv("conv.conv", mid, mid, kernel, stride, 1, in_size, "other")
        conv("expand.conv", mid, out_channels, 1, 1, 1, size, "pw_project")
        if stride != 1 or in_channels != out_channels:
            conv("shortcut.conv", in_channels, out_channels, 1, stride, 1, in_size, "other")
    elif block_type in ("fused_mbconv", "fused_mbconv_se"):
        size = conv("fused.conv", in_channels, mid, kernel, stride, 1, in_size, "pw_expand")
        if spec.se:
            se(mid)
        conv("project.conv", mid, out_channels, 1, 1, 1, size, "pw_project")
    else:
        raise RecipeError("unknown block type", key="block_type", given=block_type, allowed=BLOCK_TYPES)
    return specs


def substage_layers(stage_index: int, block_type: str, substage: SubStage, in_channels: int,
                    layout: MacroLayout = CIFAR_LAYOUT, prefix: str = "") -> list[LayerSpec]:
    """The layers of one sub-stage fed with ``in_channels`` channels at the stage's input size;
    blocks are named ``{prefix}blocks.{i}``."""
    stage = layout.stages[stage_index]
    size = layout.stage_sizes()[stage_index]
    specs: list[LayerSpec] = []
    cin = in_channels
    for i in range(substage.depth):
        stride = stage.stride if i == 0 else 1
        block = block_layers(block_type, cin, substage.width, stride, substage.kernel, substage.expand, size,
                             prefix=f"{prefix}blocks.{i}")
        specs.extend(block)
        size = conv_out(size, 3, stride)
        cin = substage.width
    return specs


def subnet_layers(choice: Any, substages: Sequence[SubStage], layout: MacroLayout = CIFAR_LAYOUT) -> list[LayerSpec]:
    """Every layer of the subnet of ``choice`` running ``substages`` (one per stage, each a
    choice of :func:`substage_choices` of that stage's cell and window): stem, stages, head."""
    choice = validate(choice, layout)
    if len(substages) != layout.num_stages:
        raise RecipeError("one sub-stage per stage", key="substages", given=len(substages),
                          allowed=f"{layout.num_stages} sub-stages")
    for index, (stage, sub) in enumerate(zip(choice.stages, substages)):
        if sub not in substage_choices(index, stage.block_type, stage.window, layout):
            raise RecipeError(f"sub-stage not in stage {index}'s cell and window", key=f"substages[{index}]",
                              given=sub, allowed=f"{stage.label}: widths "
                              f"{list(layout.stages[index].widths[stage.window[0]:stage.window[1]])}, "
                              f"{BLOCK_TYPES[stage.block_type]}")
    stem = layout.stem
    size = conv_out(layout.resolution, stem.kernel, stem.stride)
    specs = [LayerSpec(name="stem.conv", op="conv", in_channels=layout.in_channels, out_channels=stem.channels,
                       kernel_size=stem.kernel, stride=stem.stride, groups=1, in_size=layout.resolution,
                       out_size=size, bias=False, role="stem")]
    cin = stem.channels
    for index, (stage, sub) in enumerate(zip(choice.stages, substages)):
        specs.extend(substage_layers(index, stage.block_type, sub, cin, layout, prefix=f"stages.{index}."))
        cin = sub.width
    size = layout.stage_sizes()[-1]
    size = conv_out(size, 3, layout.stages[-1].stride)
    specs.append(LayerSpec(name="head.conv", op="conv", in_channels=cin, out_channels=layout.head.channels,
                           kernel_size=1, stride=1, groups=1, in_size=size, out_size=size, bias=False, role="head"))
    specs.append(LayerSpec(name="classifier.linear", op="linear", in_channels=layout.head.channels,
                           out_channels=layout.num_classes, kernel_size=1, stride=1, groups=1, in_size=1,
                           out_size=1, bias=True, role="classifier"))
    return specs


def subnet_macs(choice: Any, substages: Sequence[SubStage], layout: MacroLayout = CIFAR_LAYOUT) -> int:
    """Multiply-accumulates of one image through :func:`subnet_layers`."""
    return sum(spec.macs for spec in subnet_layers(choice, substages, layout))


def extreme_substages(choice: Any, largest: bool, layout: MacroLayout = CIFAR_LAYOUT) -> list[SubStage]:
    """The largest (widest, deepest, largest kernel and expand) or smallest sub-stage per stage."""
    choice = validate(choice, layout)
    pick = max if largest else min
    out = []
    for index, stage in enumerate(choice.stages):
        spec = BLOCK_TYPES[stage.block_type]
        widths = layout.stages[index].widths[stage.window[0]:stage.window[1]]
        out.append(SubStage(pick(widths), pick(spec.depths), pick(spec.kernels), pick(spec.expands)))
    return out
