"""The once-for-all elastic MobileNetV3 search space, described without torch.

This module is the single source of truth for the OFA MobileNetV3 layout: the supernet
(:mod:`lightning_nas.nn.ofa_mbv3`), the extracted static subnets, the accuracy-predictor encoding,
the evolutionary operators and the cost models all read their shapes from here. It must stay
importable without torch because recipe validation and search scoring run on it; the network is
built by :mod:`lightning_nas.nn.builders`.

A subnet config is a plain dict ``{"ks": [B ints], "e": [B ints], "d": [S ints], "r": int}`` with
``S`` stages of at most ``D`` blocks each (``B = S * D``): per-block depthwise kernel size and
expand ratio, per-stage depth (the first ``d`` blocks of a stage run) and the input resolution.
Entries of skipped blocks do not change the network; :meth:`OFAMobileNetV3Space.canonical` maps
them to the smallest choices so that equal networks have equal configs.

Module naming contract: every :class:`~lightning_nas.spaces.layers.LayerSpec` returned by
:meth:`OFAMobileNetV3Space.layer_specs` is named after the qualified module name (as in
``model.named_modules()``) of its convolution / linear module, and that name is the same in the
supernet and in the extracted subnet::

    stem.conv                                  role stem
    first_block.dw.conv, first_block.project.conv      roles dw, pw_project (block None)
    blocks.{b}.expand.conv                     role pw_expand
    blocks.{b}.dw.conv                         role dw
    blocks.{b}.se.reduce, blocks.{b}.se.expand roles se_reduce, se_expand
    blocks.{b}.project.conv                    role pw_project
    head.final_expand.conv, head.feature_mix.conv      role head
    classifier.linear                          role classifier

Batch norms sit next to their convolution as ``<prefix>.bn``.

Layout variants (the CIFAR layout) are named argument sets in :data:`PRESETS`, built with
:meth:`OFAMobileNetV3Space.from_preset` (the registry does so for ``ofa_mbv3_cifar``).

The space's jobs are split by module; this one holds the arguments, the block table and the
configs (sampling, validation, canonical form). The rest is called from the methods here:
:mod:`~lightning_nas.spaces.ofa_layout` (channel rounding, block specs),
:mod:`~lightning_nas.spaces.ofa_evolution` (mutation, crossover),
:mod:`~lightning_nas.spaces.ofa_encoding` (predictor encoding) and
:mod:`~lightning_nas.spaces.ofa_costs` (layer specs, MACs, parameters).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_nas.spaces import ofa_costs, ofa_encoding, ofa_evolution
from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.ofa_layout import ACTIVATIONS, BlockSpec, make_divisible

__all__ = [
    "ACTIVATIONS",
    "BlockSpec",
    "OFAMobileNetV3Space",
    "PRESETS",
    "make_divisible",
]

_CONFIG_KEYS = ("ks", "e", "d", "r")

#: Named argument sets of :class:`OFAMobileNetV3Space`, by registry name. A variant of the layout
#: is data: a preset only changes defaults, so a space built from a preset is an ordinary space
#: whose :meth:`~OFAMobileNetV3Space.hparams` rebuild it under either name.
PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet: 224x224 inputs, stride-2 stem, 1000 classes (the published once-for-all layout)
    "ofa_mbv3": {},
    # 32x32 inputs: a stride-1 stem keeps 2x2 maps in the last stage; 10 classes, small resolutions
    "ofa_mbv3_cifar": {"num_classes": 10, "resolutions": [24, 28, 32], "stem_stride": 1},
    # 32x32 inputs with 4x4 maps before the head: stride 1 in the last stage too; at width 0.75 a
    # training step ran at 0.8-1.3x the 2x2 preset's speed on the hosts measured (docs/benchmarks.md)
    "ofa_mbv3_cifar_4x4": {"num_classes": 10, "resolutions": [24, 28, 32], "stem_stride": 1,
                           "stage_strides": [2, 2, 2, 1, 1], "width_mult": 0.75},
}


class OFAMobileNetV3Space:
    """Elastic MobileNetV3 (once-for-all) space: kernel, expand ratio, depth and resolution.

    Layout: stem 3x3 conv (h-swish), one fixed MBConv (expand 1, 3x3, ReLU), ``len(stage_widths)``
    elastic stages of up to ``max(depth_choices)`` MBConv blocks, then a 1x1 conv to
    ``head_channels`` (BN, h-swish), global pooling, a 1x1 conv to ``feature_channels`` (no BN, no
    bias, h-swish), dropout and the linear classifier. All channel counts are scaled by
    ``width_mult`` and rounded with :func:`make_divisible`.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier applied to every width before rounding to multiples of 8.
        resolutions: allowed input resolutions; ``None`` means the ImageNet range 128..224 step 4.
        kernel_choices: depthwise kernel sizes (odd); the largest is stored, smaller ones are
            derived through learned transformation matrices.
        expand_choices: expand ratios of the elastic blocks.
        depth_choices: number of blocks a stage may run.
        stage_widths: output channels of each elastic stage (before ``width_mult``).
        stage_strides: stride of the first block of each stage.
        stage_activations: ``"relu"`` or ``"h_swish"`` per stage.
        se_stages: indices of the stages whose blocks use squeeze-excite.
        stem_channels: output channels of the stem convolution.
        stem_stride: stride of the stem (2 for ImageNet, 1 for 32x32 inputs).
        first_block_channels: output channels of the fixed first MBConv block.
        head_channels: channels of the final 1x1 expand layer.
        feature_channels: channels of the feature-mix layer after pooling.
        se_reduction: squeeze-excite reduction factor.
        dropout: dropout before the classifier.
        bn_momentum: batch-norm momentum (PyTorch convention).
        bn_eps: batch-norm epsilon.
    """

    #: Registry name of the space; :meth:`from_preset` sets the preset's name on the instance, so
    #: ``{"name": space.name, **space.hparams()}`` is the registry spec that rebuilds it.
    name: str = "ofa_mbv3"

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolutions: list[int] | None = None,
        kernel_choices: list[int] = [3, 5, 7],  # noqa: B006 - copied, never mutated
        expand_choices: list[int] = [3, 4, 6],  # noqa: B006
        depth_choices: list[int] = [2, 3, 4],  # noqa: B006
        stage_widths: list[int] = [24, 40, 80, 112, 160],  # noqa: B006
        stage_strides: list[int] = [2, 2, 2, 1, 2],  # noqa: B006
        stage_activations: list[str] = ["relu", "relu", "h_swish", "h_swish", "h_swish"],  # noqa: B006
        se_stages: list[int] = [1, 3, 4],  # noqa: B006
        stem_channels: int = 16,
        stem_stride: int = 2,
        first_block_channels: int = 16,
        head_channels: int = 960,
        feature_channels: int = 1280,
        se_reduction: int = 4,
        dropout: float = 0.1,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        if resolutions is None:
            resolutions = list(range(128, 225, 4))
        # the normalised constructor inputs, before width_mult scaling, so hparams() rebuilds us
        self._hparams: dict[str, Any] = {
            "num_classes": int(num_classes),
            "width_mult": float(width_mult),
            "resolutions": sorted({int(r) for r in resolutions}),
            "kernel_choices": sorted({int(k) for k in kernel_choices}),
            "expand_choices": sorted({int(e) for e in expand_choices}),
            "depth_choices": sorted({int(d) for d in depth_choices}),
            "stage_widths": [int(w) for w in stage_widths],
            "stage_strides": [int(s) for s in stage_strides],
            "stage_activations": [str(a) for a in stage_activations],
            "se_stages": sorted({int(s) for s in se_stages}),
            "stem_channels": int(stem_channels),
            "stem_stride": int(stem_stride),
            "first_block_channels": int(first_block_channels),
            "head_channels": int(head_channels),
            "feature_channels": int(feature_channels),
            "se_reduction": int(se_reduction),
            "dropout": float(dropout),
            "bn_momentum": float(bn_momentum),
            "bn_eps": float(bn_eps),
        }
        h = self._hparams
        self.num_classes: int = h["num_classes"]
        self.width_mult: float = h["width_mult"]
        self.resolutions: list[int] = list(h["resolutions"])
        self.kernel_choices: list[int] = list(h["kernel_choices"])
        self.expand_choices: list[int] = list(h["expand_choices"])
        self.depth_choices: list[int] = list(h["depth_choices"])
        self.stage_widths: list[int] = list(h["stage_widths"])
        self.stage_strides: list[int] = list(h["stage_strides"])
        self.stage_activations: list[str] = list(h["stage_activations"])
        self.se_stages: list[int] = list(h["se_stages"])
        self.stem_stride: int = h["stem_stride"]
        self.se_reduction: int = h["se_reduction"]
        self.dropout: float = h["dropout"]
        self.bn_momentum: float = h["bn_momentum"]
        self.bn_eps: float = h["bn_eps"]
        self._check_layout()

        # Rounded channel counts. The feature-mix width only grows with width_mult, as in the
        # MobileNetV3 paper, so that narrow networks keep a wide final representation.
        self.stem_channels = make_divisible(h["stem_channels"] * self.width_mult)
        self.first_block_channels = make_divisible(h["first_block_channels"] * self.width_mult)
        self.widths = [make_divisible(w * self.width_mult) for w in self.stage_widths]
        self.head_channels = make_divisible(h["head_channels"] * self.width_mult)
        self.feature_channels = (
            make_divisible(h["feature_channels"] * self.width_mult)
            if self.width_mult > 1.0
            else h["feature_channels"]
        )

        self.num_stages = len(self.stage_widths)
        self.max_depth = max(self.depth_choices)
        self.num_blocks = self.num_stages * self.max_depth
        self.blocks = self._block_specs()

    # ------------------------------------------------------------------ layout

    def _check_layout(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_classes > 0, f"num_classes must be positive, got {self.num_classes}")
        need(self.width_mult > 0, f"width_mult must be positive, got {self.width_mult}")
        need(
            bool(self.resolutions) and min(self.resolutions) > 0,
            f"resolutions must be positive, got {self.resolutions}",
        )
        need(
            bool(self.kernel_choices) and all(k > 0 and k % 2 == 1 for k in self.kernel_choices),
            f"kernel_choices must be odd positive sizes, got {self.kernel_choices}",
        )
        need(
            bool(self.expand_choices) and min(self.expand_choices) > 0,
            f"expand_choices must be positive, got {self.expand_choices}",
        )
        need(
            bool(self.depth_choices) and min(self.depth_choices) > 0,
            f"depth_choices must be positive, got {self.depth_choices}",
        )
        stages = len(self.stage_widths)
        need(stages > 0, "stage_widths must not be empty")
        for name in ("stage_strides", "stage_activations"):
            need(
                len(getattr(self, name)) == stages,
                f"{name} has {len(getattr(self, name))} entries but stage_widths has {stages}",
            )
        need(all(w > 0 for w in self.stage_widths), f"stage_widths must be positive, got {self.stage_widths}")
        need(
            all(s in (1, 2) for s in self.stage_strides),
            f"stage_strides must be 1 or 2, got {self.stage_strides}",
        )
        for act in self.stage_activations:
            need(act in ACTIVATIONS, f"stage_activations entry {act!r} is not one of {list(ACTIVATIONS)}")
        need(
            all(0 <= s < stages for s in self.se_stages),
            f"se_stages must be stage indices in [0, {stages}), got {self.se_stages}",
        )
        need(self.stem_stride in (1, 2), f"stem_stride must be 1 or 2, got {self.stem_stride}")
        for name in ("stem_channels", "first_block_channels", "head_channels", "feature_channels"):
            need(self._hparams[name] > 0, f"{name} must be positive, got {self._hparams[name]}")
        need(self.se_reduction > 0, f"se_reduction must be positive, got {self.se_reduction}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    def _block_specs(self) -> list[BlockSpec]:
        specs = []
        in_channels = self.first_block_channels
        for stage, (width, stride, act) in enumerate(
            zip(self.widths, self.stage_strides, self.stage_activations)
        ):
            for position in range(self.max_depth):
                specs.append(
                    BlockSpec(
                        index=len(specs),
                        stage=stage,
                        position=position,
                        in_channels=in_channels,
                        out_channels=width,
                        stride=stride if position == 0 else 1,
                        activation=act,
                        use_se=stage in self.se_stages,
                    )
                )
                in_channels = width
        return specs

    @classmethod
    def from_preset(cls, preset: str, **arguments: Any) -> OFAMobileNetV3Space:
        """The space of a named preset of :data:`PRESETS`; ``arguments`` override the preset's."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} of {cls.__name__}; presets: {sorted(PRESETS)}")
        space = cls(**{**PRESETS[preset], **arguments})
        space.name = preset
        return space

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this space (for checkpoints and logs)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._hparams.items()}

    def mid_channels(self, block: int, expand: int) -> int:
        """Expanded (hidden) channels of elastic block ``block`` at expand ratio ``expand``."""
        return make_divisible(round(self.blocks[block].in_channels * expand))

    def max_mid_channels(self, block: int) -> int:
        return self.mid_channels(block, max(self.expand_choices))

    def se_channels(self, mid: int) -> int:
        """Hidden channels of the squeeze-excite module on ``mid`` channels."""
        return make_divisible(mid // self.se_reduction)

    def stage_blocks(self, stage: int) -> range:
        """Indices of the elastic blocks of ``stage``."""
        return range(stage * self.max_depth, (stage + 1) * self.max_depth)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"

    def __eq__(self, other: object) -> bool:
        # Equal arguments are the same network whichever preset they came from: the name is a label.
        if not isinstance(other, OFAMobileNetV3Space):
            return NotImplemented  # lets a wrapper of a space compare itself
        return type(other) is type(self) and other.hparams() == self.hparams()

    def __hash__(self) -> int:
        return hash(repr(self))

    # ------------------------------------------------------------------ configs

    def largest(self) -> dict:
        """The largest subnet: every block, largest kernel and expand ratio, highest resolution."""
        return {
            "ks": [max(self.kernel_choices)] * self.num_blocks,
            "e": [max(self.expand_choices)] * self.num_blocks,
            "d": [self.max_depth] * self.num_stages,
            "r": max(self.resolutions),
        }

    def smallest(self) -> dict:
        """The smallest subnet: minimum depth, kernel, expand ratio and resolution."""
        return self.canonical(
            {
                "ks": [min(self.kernel_choices)] * self.num_blocks,
                "e": [min(self.expand_choices)] * self.num_blocks,
                "d": [min(self.depth_choices)] * self.num_stages,
                "r": min(self.resolutions),
            }
        )

    def sample(self, rng: random.Random) -> dict:
        """A uniformly random canonical subnet config drawn from ``rng``."""
        config = {
            "ks": [rng.choice(self.kernel_choices) for _ in range(self.num_blocks)],
            "e": [rng.choice(self.expand_choices) for _ in range(self.num_blocks)],
            "d": [rng.choice(self.depth_choices) for _ in range(self.num_stages)],
            "r": rng.choice(self.resolutions),
        }
        return self.canonical(config)

    def validate(self, config: Mapping[str, Any]) -> dict:
        """Check ``config`` against the space and return a normalised copy (plain lists and ints).

        Raises:
            ValueError: naming the offending key (and index), the bad value and what is allowed.
        """
        if not isinstance(config, Mapping):
            raise ValueError(
                f"config must be a mapping with keys {list(_CONFIG_KEYS)}, got {type(config).__name__}"
            )
        missing = [k for k in _CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"config is missing key(s) {missing}; a config needs {list(_CONFIG_KEYS)}")
        extra = sorted(str(k) for k in config if k not in _CONFIG_KEYS)
        if extra:
            raise ValueError(f"config has unknown key(s) {extra}; allowed keys are {list(_CONFIG_KEYS)}")

        def check_list(key: str, length: int, allowed: list[int]) -> list[int]:
            values = config[key]
            # Fast path (search calls this on every candidate): a plain list of valid plain ints.
            if type(values) is list and len(values) == length and all(type(v) is int and v in allowed for v in values):
                return list(values)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"config[{key!r}] must be a list of {length} ints from {allowed}, got {values!r}"
                )
            if len(values) != length:
                raise ValueError(
                    f"config[{key!r}] must have {length} entries, got {len(values)}: {list(values)!r}"
                )
            for i, v in enumerate(values):
                if not _is_int(v) or v not in allowed:
                    raise ValueError(f"config[{key!r}][{i}] = {v!r} is not allowed; choose from {allowed}")
            return [int(v) for v in values]

        out = {
            "ks": check_list("ks", self.num_blocks, self.kernel_choices),
            "e": check_list("e", self.num_blocks, self.expand_choices),
            "d": check_list("d", self.num_stages, self.depth_choices),
        }
        r = config["r"]
        if not _is_int(r) or r not in self.resolutions:
            raise ValueError(f"config['r'] = {r!r} is not allowed; choose from {self.resolutions}")
        out["r"] = int(r)
        return out

    def active_blocks(self, config: Mapping[str, Any]) -> list[int]:
        """Indices of the elastic blocks that run in ``config`` (the first ``d`` of each stage)."""
        depths = config["d"]
        return [b for s in range(self.num_stages) for b in self.stage_blocks(s)[: depths[s]]]

    def canonical(self, config: Mapping[str, Any]) -> dict:
        """Validated copy of ``config`` whose skipped blocks use the smallest kernel and ratio.

        Skipped blocks do not affect the network, so two configs describe the same subnet iff
        their canonical forms are equal. The normalised values stay valid choices so a canonical
        config is an ordinary config everywhere.
        """
        config = self.validate(config)
        active = set(self.active_blocks(config))
        k_min, e_min = min(self.kernel_choices), min(self.expand_choices)
        for b in range(self.num_blocks):
            if b not in active:
                config["ks"][b] = k_min
                config["e"][b] = e_min
        return config

    def config_key(self, config: Mapping[str, Any]) -> tuple:
        """A hashable identity of the subnet (equal for configs describing the same network)."""
        c = self.canonical(config)
        return (tuple(c["ks"]), tuple(c["e"]), tuple(c["d"]), c["r"])

    def reference_subnets(self, num_random: int = 2, seed: int = 0) -> dict[str, dict]:
        """Named subnets to track during training: smallest, largest and ``random{i}``.

        The random ones depend only on ``seed`` so every run (and every rank) sees the same ones.
        """
        rng = random.Random(seed)
        subnets = {"smallest": self.smallest(), "largest": self.largest()}
        for i in range(num_random):
            subnets[f"random{i}"] = self.sample(rng)
        return subnets

    # ------------------------------------------------------------------ evolution

    def mutate(
        self, config: Mapping[str, Any], rng: random.Random, prob: float = 0.1, resolution_prob: float = 0.5
    ) -> dict:
        """Resample each block's kernel and expand ratio and each stage's depth with ``prob``,
        the resolution with ``resolution_prob``; returns a canonical config (see
        :func:`~lightning_nas.spaces.ofa_evolution.mutate`)."""
        return ofa_evolution.mutate(self, config, rng, prob, resolution_prob)

    def crossover(self, a: Mapping[str, Any], b: Mapping[str, Any], rng: random.Random) -> dict:
        """Uniform crossover of two parents; returns a canonical config (see
        :func:`~lightning_nas.spaces.ofa_evolution.crossover`)."""
        return ofa_evolution.crossover(self, a, b, rng)

    # ------------------------------------------------------------------ encoding (ofa_encoding)

    @property
    def encoding_size(self) -> int:
        """Length of :meth:`encode`'s vector."""
        return ofa_encoding.encoding_size(self)

    def encode(self, config: Mapping[str, Any]) -> list[float]:
        """One-hot feature vector for accuracy predictors (layout: :mod:`~lightning_nas.spaces.ofa_encoding`).

        One-to-one on canonical configs (see :meth:`decode`).
        """
        return ofa_encoding.encode(self, config)

    def decode(self, vector: Sequence[float]) -> dict:
        """Inverse of :meth:`encode`: the canonical config of a one-hot vector."""
        return ofa_encoding.decode(self, vector)

    # ------------------------------------------------------------------ costs (ofa_costs)

    def layer_specs(self, config: Mapping[str, Any], resolution: int | None = None) -> list[LayerSpec]:
        """Every convolution / linear layer of the subnet, in execution order.

        Names follow the module naming contract of this module, so a spec names the same module in
        the supernet and in the extracted subnet. ``resolution`` overrides ``config["r"]`` (the
        network itself runs at any input size; only the config must use the space's resolutions).
        """
        return ofa_costs.layer_specs(self, config, resolution)

    def batchnorm_channels(self, config: Mapping[str, Any]) -> list[int]:
        """Channel count of every batch norm of the subnet (one per conv except SE / feature mix)."""
        return ofa_costs.batchnorm_channels(self, config)

    def macs(self, config: Mapping[str, Any], resolution: int | None = None) -> int:
        """Multiply-accumulates of one image through the subnet (convolutions and linear layers
        only; pooling, activations, batch norm and the squeeze-excite scaling are not counted).
        ``resolution`` overrides ``config["r"]``."""
        return ofa_costs.macs(self, config, resolution)

    def params(self, config: Mapping[str, Any]) -> int:
        """Trainable parameters of the extracted subnet: conv / linear weights and biases plus the
        batch-norm affine weights and biases (2 per channel; running statistics are buffers and
        are not counted)."""
        return ofa_costs.params(self, config)


def _is_int(value: Any) -> bool:
    # bools are ints in Python but never a meaningful kernel size or resolution
    return isinstance(value, int) and not isinstance(value, bool)
