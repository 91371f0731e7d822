"""The subnets of one SpaceEvo space, as a search space of the project (torch-free).

A point of the space of spaces (:class:`~lightning_nas.spaces.spaceevo_layout.SpaceChoice`: per
stage a block type and a width window) is itself a search space: its subnets run, per stage, one
:class:`~lightning_nas.spaces.spaceevo_layout.SubStage` (a width of the window, a depth, a kernel
and an expand ratio of the stage's block type). :class:`SpaceEvoSubnetSpace` is that space with the
project's protocols (:class:`~lightning_nas.spaces.protocol.SearchSpace`,
:class:`~lightning_nas.spaces.protocol.BoundedSpace`,
:class:`~lightning_nas.spaces.protocol.CostModelSpace`), so the search strategies, predictors and
cost models written for the once-for-all space work on it. It is not an
:class:`~lightning_nas.spaces.protocol.ElasticSpace`: kernels and expand ratios differ per stage
and the width is elastic.

A config is a dict of per-stage lists ``{"w": [S], "d": [S], "ks": [S], "e": [S]}`` (width,
depth, kernel, expand ratio of every stage). Every entry changes the network, so the canonical
form is the validated config. Layers and their names come from
:func:`~lightning_nas.spaces.spaceevo_layout.subnet_layers`; the supernet and the extracted subnets
(:mod:`lightning_nas.nn.spaceevo_net`) use the same names.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_nas.errors import RecipeError
from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.spaceevo_layout import (
    BLOCK_TYPES,
    CIFAR_LAYOUT,
    HeadSpec,
    MacroLayout,
    SpaceChoice,
    StageSpec,
    StemSpec,
    SubStage,
    space_id,
    subnet_layers,
)
from lightning_nas.spaces.spaceevo_layout import validate as validate_choice

__all__ = ["CONFIG_KEYS", "SpaceEvoSubnetSpace", "layout_from_hparams", "layout_hparams"]

#: Per-stage lists of a config: width, depth, kernel, expand ratio.
CONFIG_KEYS = ("w", "d", "ks", "e")
_FIELDS = {"w": "width", "d": "depth", "ks": "kernel", "e": "expand"}
#: Layers without a batch norm after them.
_NO_BN_ROLES = ("se_reduce", "se_expand", "classifier")


def layout_hparams(layout: MacroLayout) -> str | dict[str, Any]:
    """The plain form of a layout: its name for the CIFAR layout, else every field."""
    if layout == CIFAR_LAYOUT:
        return CIFAR_LAYOUT.name
    data = dataclasses.asdict(layout)
    data["stages"] = [{"stride": s["stride"], "widths": list(s["widths"])} for s in data["stages"]]
    data["block_types"] = list(data["block_types"])
    return data


def layout_from_hparams(value: MacroLayout | str | Mapping[str, Any]) -> MacroLayout:
    """Inverse of :func:`layout_hparams` (a :class:`MacroLayout` passes through)."""
    if isinstance(value, MacroLayout):
        return value
    if isinstance(value, str):
        if value != CIFAR_LAYOUT.name:
            raise RecipeError("unknown SpaceEvo layout", key="layout", given=value, allowed=[CIFAR_LAYOUT.name])
        return CIFAR_LAYOUT
    if not isinstance(value, Mapping):
        raise RecipeError("a layout is a name or the fields of a MacroLayout", key="layout", given=value,
                          allowed=[CIFAR_LAYOUT.name])
    data = dict(value)
    try:
        return MacroLayout(
            name=str(data["name"]),
            resolution=int(data["resolution"]),
            num_classes=int(data["num_classes"]),
            stem=StemSpec(**data["stem"]),
            stages=tuple(StageSpec(int(s["stride"]), tuple(int(w) for w in s["widths"])) for s in data["stages"]),
            head=HeadSpec(**data["head"]),
            block_types=tuple(data.get("block_types", tuple(BLOCK_TYPES))),
            in_channels=int(data.get("in_channels", 3)),
        )
    except (KeyError, TypeError) as error:
        raise RecipeError(f"incomplete SpaceEvo layout ({error})", key="layout", given=sorted(data),
                          allowed="name, resolution, num_classes, stem, stages, head") from None


class SpaceEvoSubnetSpace:
    """The subnets of one SpaceEvo space (a :class:`SpaceChoice` over a :class:`MacroLayout`).

    Args:
        space: the space: a :class:`SpaceChoice`, its string id (``"mbconv_se[1:5]-..."``) or
            per-stage ``(block_type, [start, stop])`` pairs.
        layout: the macro layout (default the CIFAR layout), by name or as its fields.
    """

    name: str = "spaceevo_subnets"

    def __init__(self, space: SpaceChoice | str | Sequence[Any],
                 layout: MacroLayout | str | Mapping[str, Any] = CIFAR_LAYOUT) -> None:
        self.layout = layout_from_hparams(layout)
        self.choice = validate_choice(space, self.layout)
        self.num_stages = self.layout.num_stages
        self.block_types = [stage.block_type for stage in self.choice.stages]
        self.stage_strides = [stage.stride for stage in self.layout.stages]
        #: The window of widths of each stage, ascending.
        self.stage_widths: list[list[int]] = [
            list(self.layout.stages[i].widths[stage.window[0]:stage.window[1]])
            for i, stage in enumerate(self.choice.stages)
        ]
        specs = [BLOCK_TYPES[name] for name in self.block_types]
        self.depth_choices = [sorted(spec.depths) for spec in specs]
        self.kernel_choices = [sorted(spec.kernels) for spec in specs]
        self.expand_choices = [sorted(spec.expands) for spec in specs]
        self._choices = {"w": self.stage_widths, "d": self.depth_choices, "ks": self.kernel_choices,
                         "e": self.expand_choices}

    # ------------------------------------------------------------------ identity

    def hparams(self) -> dict[str, Any]:
        return {"space": space_id(self.choice), "layout": layout_hparams(self.layout)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(space={space_id(self.choice)!r}, layout={self.layout.name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpaceEvoSubnetSpace):
            return NotImplemented
        return other.choice == self.choice and other.layout == self.layout

    def __hash__(self) -> int:
        return hash((self.choice, self.layout))

    # ------------------------------------------------------------------ configs

    def substages(self, config: Mapping[str, Any]) -> list[SubStage]:
        """The sub-stage of every stage of ``config``."""
        c = self.validate(config)
        return [SubStage(c["w"][s], c["d"][s], c["ks"][s], c["e"][s]) for s in range(self.num_stages)]

    def config_of(self, substages: Sequence[SubStage]) -> dict:
        """The config running ``substages`` (one per stage)."""
        if len(substages) != self.num_stages:
            raise ValueError(f"need {self.num_stages} sub-stages, got {len(substages)}")
        return self.validate({key: [getattr(sub, _FIELDS[key]) for sub in substages] for key in CONFIG_KEYS})

    def largest(self) -> dict:
        return {key: [max(c) for c in self._choices[key]] for key in CONFIG_KEYS}

    def smallest(self) -> dict:
        return {key: [min(c) for c in self._choices[key]] for key in CONFIG_KEYS}

    def sample(self, rng: random.Random) -> dict:
        """Per stage a uniform width, depth, kernel and expand ratio."""
        return {key: [rng.choice(c) for c in self._choices[key]] for key in CONFIG_KEYS}

    def validate(self, config: Any) -> dict:
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping with keys {list(CONFIG_KEYS)}, got {type(config).__name__}")
        missing = [k for k in CONFIG_KEYS if k not in config]
        extra = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if missing or extra:
            raise ValueError(f"config keys must be {list(CONFIG_KEYS)}; missing {missing}, unknown {extra}")
        out: dict[str, list] = {}
        for key in CONFIG_KEYS:
            values = config[key]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != self.num_stages:
                raise ValueError(f"config[{key!r}] must be a list of {self.num_stages} entries, got {values!r}")
            checked = []
            for s, (value, allowed) in enumerate(zip(values, self._choices[key])):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in allowed:
                    raise ValueError(f"config[{key!r}][{s}] = {value!r} is not allowed for stage {s} "
                                     f"({self.block_types[s]}); choose from {allowed}")
                # the choice itself, so an expand ratio 1 given as 1.0 comes back as the type's int
                checked.append(allowed[allowed.index(value)])
            out[key] = checked
        return out

    def canonical(self, config: Any) -> dict:
        """The validated config: every entry changes the network."""
        return self.validate(config)

    def config_key(self, config: Any) -> tuple:
        c = self.validate(config)
        return tuple(tuple(c[key]) for key in CONFIG_KEYS)

    # ------------------------------------------------------------------ evolution

    def mutate(self, config: Any, rng: random.Random, prob: float = 0.2) -> dict:
        """Each stage's width, depth, kernel and expand ratio resampled with ``prob``."""
        c = self.validate(config)
        for key in CONFIG_KEYS:
            for s, allowed in enumerate(self._choices[key]):
                if rng.random() < prob:
                    c[key][s] = rng.choice(allowed)
        return c

    def crossover(self, first: Any, second: Any, rng: random.Random) -> dict:
        """Every gene (one per stage and key) from either parent with equal odds."""
        a, b = self.validate(first), self.validate(second)
        return {key: [x if rng.random() < 0.5 else y for x, y in zip(a[key], b[key])] for key in CONFIG_KEYS}

    # ------------------------------------------------------------------ encoding

    @property
    def encoding_size(self) -> int:
        """Per stage one-hots of width, depth, kernel and expand ratio."""
        return sum(len(c) for key in CONFIG_KEYS for c in self._choices[key])

    def encode(self, config: Any) -> list[float]:
        c = self.validate(config)
        vector: list[float] = []
        for s in range(self.num_stages):
            for key in CONFIG_KEYS:
                allowed = self._choices[key][s]
                chunk = [0.0] * len(allowed)
                chunk[allowed.index(c[key][s])] = 1.0
                vector.extend(chunk)
        return vector

    def decode(self, vector: Sequence[float]) -> dict:
        if len(vector) != self.encoding_size:
            raise ValueError(f"encoding must have {self.encoding_size} entries, got {len(vector)}")
        config: dict[str, list] = {key: [] for key in CONFIG_KEYS}
        offset = 0
        for s in range(self.num_stages):
            for key in CONFIG_KEYS:
                allowed = self._choices[key][s]
                chunk = vector[offset: offset + len(allowed)]
                hot = [i for i, v in enumerate(chunk) if v > 0.5]
                if len(hot) != 1:
                    raise ValueError(f"encoding of stage {s} {key!r} at offset {offset} is not one-hot: {list(chunk)}")
                config[key].append(allowed[hot[0]])
                offset += len(allowed)
        return self.validate(config)

    # ------------------------------------------------------------------ costs

    def layer_specs(self, config: Any, resolution: int | None = None) -> list[LayerSpec]:
        """Every conv / linear layer of the subnet (``spaceevo_layout.subnet_layers``);
        ``resolution`` overrides the layout's input size."""
        layout = self.layout if resolution is None else dataclasses.replace(self.layout, resolution=int(resolution))
        return subnet_layers(self.choice, self.substages(config), layout)

    def batchnorm_channels(self, config: Any) -> list[int]:
        """Channels of every batch norm (one after each conv but the squeeze-excite ones)."""
        return [spec.out_channels for spec in self.layer_specs(config) if spec.role not in _NO_BN_ROLES]

    def macs(self, config: Any, resolution: int | None = None) -> int:
        return sum(spec.macs for spec in self.layer_specs(config, resolution))

    def params(self, config: Any) -> int:
        """Conv / linear weights and biases plus the batch-norm affine parameters (2 per channel)."""
        return sum(spec.params for spec in self.layer_specs(config)) + 2 * sum(self.batchnorm_channels(config))
