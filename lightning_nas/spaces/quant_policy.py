"""APQ quantization policies: the single source of truth for their format, sampling and encoding.

A policy gives every elastic block slot four bit widths, as JSON-friendly lists with one entry per
slot (slot ``i`` is the layer's ``LayerSpec.block == i``)::

    {"pw_w": [...], "pw_a": [...], "dw_w": [...], "dw_a": [...]}

``pw_*`` apply to the block's pointwise convolutions (``pw_expand`` and ``pw_project``), ``dw_*``
to its depthwise convolution; ``*_w`` are weight bits and ``*_a`` the bits of the layer's input
activation. Every layer outside the elastic blocks (``block is None``: stem, the first fixed
block, head, classifier) runs at ``fixed_bits``.

Squeeze-excite layers (``se_reduce``/``se_expand``) also run at ``fixed_bits``: they work on a
pooled 1x1 map, so they cost a negligible share of the MACs and low bits would save nothing, while
their output gates every channel of the block, so their error is amplified. Keeping them fixed
also keeps APQ's four-entries-per-block policy format for spaces with and without SE.

Slots of skipped blocks (elastic depth) still carry bits, so a policy stays valid for any depth;
:meth:`QuantPolicySpace.encode` zeroes them so the predictor does not see bits that have no effect.

This module must not import torch: recipe validation and search scoring use it.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only attributes are read; the module stays loadable on its own, without its package
    from lightning_nas.spaces.layers import LayerSpec

#: Policy keys, in the order they appear in the encoding.
POLICY_KEYS: tuple[str, ...] = ("pw_w", "pw_a", "dw_w", "dw_a")

#: Layer role -> policy key prefix for layers inside elastic blocks; other roles are fixed.
ROLE_TO_KIND: dict[str, str] = {"pw_expand": "pw", "pw_project": "pw", "dw": "dw"}

#: Bit widths a quantizer supports (see ``lightning_nas.nn.quant``); 32 means full precision.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
FULL_PRECISION_BITS = 32

Policy = dict[str, list[int]]


def _as_rng(rng: random.Random | int | None) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(rng)



def check_bit_choices(choices: Sequence[int]) -> None:
    """ValueError unless ``choices`` are distinct supported bit widths (recipe validation calls it
    for every ``BitChoices`` value, so a bad width fails before torch is imported)."""
    choices = list(choices)
    if not choices:
        raise ValueError("bit_choices must not be empty")
    bad = [b for b in choices if isinstance(b, bool) or b not in SUPPORTED_BITS]
    if bad:
        raise ValueError(f"bit_choices {bad} not supported; allowed bit widths: {list(SUPPORTED_BITS)}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"bit_choices has duplicates: {choices}")


def check_fixed_bits(bits: int) -> None:
    """ValueError unless ``bits`` is a supported width or full precision."""
    if isinstance(bits, bool) or bits not in (*SUPPORTED_BITS, FULL_PRECISION_BITS):
        raise ValueError(f"fixed_bits={bits!r} not supported; allowed: {list(SUPPORTED_BITS)} "
                         f"or {FULL_PRECISION_BITS} (full precision)")

class QuantPolicySpace:
    """The space of per-block mixed-precision policies searched by APQ.

    Args:
        bit_choices: bit widths each policy entry may take (APQ: 4, 6, 8).
        fixed_bits: bits of every layer outside the elastic blocks (and of SE layers); 32 keeps
            them in full precision.
    """

    def __init__(
        self,
        # A literal default keeps the signature readable by the recipe validator; it is copied below.
        bit_choices: list[int] = [4, 6, 8],  # noqa: B006
        fixed_bits: int = 8,
    ) -> None:
        choices = list(bit_choices)
        check_bit_choices(choices)
        check_fixed_bits(fixed_bits)
        self.bit_choices: list[int] = sorted(choices)
        self.fixed_bits: int = fixed_bits

    def __repr__(self) -> str:
        return f"QuantPolicySpace(bit_choices={self.bit_choices}, fixed_bits={self.fixed_bits})"

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this space."""
        return {"bit_choices": list(self.bit_choices), "fixed_bits": self.fixed_bits}

    def over(self, num_blocks: int) -> BlockPolicySpace:
        """This space over ``num_blocks`` block slots: a search space of its own (the
        :class:`~lightning_nas.spaces.protocol.SearchSpace` protocol), since a policy is only a
        point once the number of slots is fixed."""
        return BlockPolicySpace(self, num_blocks)

    # ------------------------------------------------------------------ construction

    def uniform(self, bits: int, num_blocks: int) -> Policy:
        """The policy giving every entry ``bits``."""
        if bits not in self.bit_choices:
            raise ValueError(f"uniform bits {bits!r} is not in the allowed set {self.bit_choices}")
        return {key: [bits] * num_blocks for key in POLICY_KEYS}

    def sample(self, rng: random.Random | int | None, num_blocks: int) -> Policy:
        """A policy with every entry drawn uniformly from ``bit_choices``."""
        r = _as_rng(rng)
        return {key: [r.choice(self.bit_choices) for _ in range(num_blocks)] for key in POLICY_KEYS}

    def mutate(
        self, policy: Mapping[str, Sequence[int]], rng: random.Random | int | None, prob: float = 0.1
    ) -> Policy:
        """A copy where each entry is redrawn from ``bit_choices`` with probability ``prob``."""
        r = _as_rng(rng)
        num_blocks = len(policy[POLICY_KEYS[0]]) if POLICY_KEYS[0] in policy else 0
        self.validate(policy, num_blocks)
        return {
            key: [r.choice(self.bit_choices) if r.random() < prob else int(b) for b in policy[key]]
            for key in POLICY_KEYS
        }

    def crossover(
        self,
        first: Mapping[str, Sequence[int]],
        second: Mapping[str, Sequence[int]],
        rng: random.Random | int | None,
    ) -> Policy:
        """Uniform crossover: every entry comes from either parent with equal probability."""
        r = _as_rng(rng)
        num_blocks = len(first[POLICY_KEYS[0]]) if POLICY_KEYS[0] in first else 0
        self.validate(first, num_blocks)
        self.validate(second, num_blocks)
        return {
            key: [int(a) if r.random() < 0.5 else int(b) for a, b in zip(first[key], second[key])]
            for key in POLICY_KEYS
        }

    # ------------------------------------------------------------------ checking

    def validate(self, policy: Mapping[str, Sequence[int]], num_blocks: int) -> Policy:
        """Check ``policy`` against this space; return it normalised to plain ``int`` lists.

        Raises ``ValueError`` naming the offending key, index, value and the allowed set.
        """
        # Fast path (search calls this on every candidate): plain dict of plain int lists, all valid.
        allowed = set(self.bit_choices)
        if type(policy) is dict and len(policy) == len(POLICY_KEYS) and all(
            type(values := policy.get(key)) is list and len(values) == num_blocks
            and all(type(v) is int and v in allowed for v in values)
            for key in POLICY_KEYS
        ):
            return {key: list(policy[key]) for key in POLICY_KEYS}
        if not isinstance(policy, Mapping):
            raise ValueError(
                f"quantization policy must be a mapping with keys {list(POLICY_KEYS)}, got {type(policy).__name__}"
            )
        missing = [k for k in POLICY_KEYS if k not in policy]
        if missing:
            raise ValueError(
                f"quantization policy is missing key(s) {missing}; expected keys {list(POLICY_KEYS)}"
            )
        unknown = sorted(str(k) for k in policy if k not in POLICY_KEYS)
        if unknown:
            raise ValueError(
                f"quantization policy has unknown key(s) {unknown}; expected keys {list(POLICY_KEYS)}"
            )
        normalised: Policy = {}
        for key in POLICY_KEYS:
            values = policy[key]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"quantization policy key '{key}' must be a list of bit widths, got {values!r}"
                )
            if len(values) != num_blocks:
                raise ValueError(
                    f"quantization policy key '{key}' has {len(values)} entries, expected {num_blocks} "
                    f"(one per block slot)"
                )
            for index, value in enumerate(values):
                if (
                    isinstance(value, bool)
                    or not isinstance(value, numbers.Integral)
                    or value not in self.bit_choices
                ):
                    raise ValueError(
                        f"quantization policy key '{key}' index {index}: value {value!r} is not in the "
                        f"allowed set {self.bit_choices}"
                    )
            normalised[key] = [int(v) for v in values]
        return normalised

    # ------------------------------------------------------------------ predictor input

    def encoding_size(self, num_blocks: int) -> int:
        return num_blocks * len(POLICY_KEYS) * len(self.bit_choices)

    def encode(self, policy: Mapping[str, Sequence[int]], active_blocks: Sequence[bool]) -> list[float]:
        """One-hot encoding for the quantization-aware predictor.

        Per block slot, in order: one-hot of ``pw_w``, ``pw_a``, ``dw_w``, ``dw_a`` over
        ``bit_choices``; a skipped block (``active_blocks[i]`` false) is all zeros.
        """
        num_blocks = len(active_blocks)
        checked = self.validate(policy, num_blocks)
        width = len(self.bit_choices)
        out: list[float] = []
        for block, active in enumerate(active_blocks):
            for key in POLICY_KEYS:
                one_hot = [0.0] * width
                if active:
                    one_hot[self.bit_choices.index(checked[key][block])] = 1.0
                out.extend(one_hot)
        return out

    # ------------------------------------------------------------------ binding to layers

    def bits_for_layers(
        self, layer_specs: Sequence[LayerSpec], policy: Mapping[str, Sequence[int]]
    ) -> dict[str, tuple[int, int]]:
        """Map every layer name to its ``(weight_bits, activation_bits)`` under ``policy``.

        The number of block slots is taken from the policy itself; a layer whose ``block`` index
        falls outside it is an error (the space and the policy disagree).
        """
        num_blocks = (
            len(policy[POLICY_KEYS[0]]) if isinstance(policy, Mapping) and POLICY_KEYS[0] in policy else 0
        )
        checked = self.validate(policy, num_blocks)
        out: dict[str, tuple[int, int]] = {}
        for spec in layer_specs:
            kind = ROLE_TO_KIND.get(spec.role)
            if kind is None or spec.block is None:
                out[spec.name] = (self.fixed_bits, self.fixed_bits)
                continue
            if not 0 <= spec.block < num_blocks:
                raise ValueError(
                    f"layer '{spec.name}' belongs to block {spec.block}, but the policy has {num_blocks} block slots"
                )
            out[spec.name] = (checked[f"{kind}_w"][spec.block], checked[f"{kind}_a"][spec.block])
        return out

    def average_bits(
        self, policy: Mapping[str, Sequence[int]], layer_specs: Sequence[LayerSpec]
    ) -> tuple[float, float]:
        """MAC-weighted mean ``(weight_bits, activation_bits)`` of a concrete network.

        Full-precision layers count as 32 bits. A network with no MACs returns ``(0.0, 0.0)``.
        """
        bits = self.bits_for_layers(layer_specs, policy)
        total = sum(spec.macs for spec in layer_specs)
        if total == 0:
            return 0.0, 0.0
        weight = sum(spec.macs * bits[spec.name][0] for spec in layer_specs) / total
        act = sum(spec.macs * bits[spec.name][1] for spec in layer_specs) / total
        return weight, act


class BlockPolicySpace:
    """The policies of a :class:`QuantPolicySpace` over a fixed number of block slots.

    Every slot counts as running here (:meth:`encode` sets all of them); in a joint space, where
    the architecture decides which blocks run, the joint space encodes and canonicalises.
    """

    #: Name of the space in reports (policy spaces are built from ``bit_choices``, not the registry).
    name: str = "quant_policy"

    def __init__(self, policy_space: QuantPolicySpace, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        self.policy_space = policy_space
        self.num_blocks = num_blocks

    def __repr__(self) -> str:
        return f"{self.policy_space!r}.over({self.num_blocks})"

    def hparams(self) -> dict[str, Any]:
        return {**self.policy_space.hparams(), "num_blocks": self.num_blocks}

    def sample(self, rng: random.Random) -> Policy:
        return self.policy_space.sample(rng, self.num_blocks)

    def mutate(self, policy: Mapping[str, Sequence[int]], rng: random.Random, prob: float = 0.1) -> Policy:
        return self.policy_space.mutate(self.validate(policy), rng, prob)

    def crossover(self, first: Mapping[str, Sequence[int]], second: Mapping[str, Sequence[int]],
                  rng: random.Random) -> Policy:
        return self.policy_space.crossover(self.validate(first), self.validate(second), rng)

    def validate(self, policy: Mapping[str, Sequence[int]]) -> Policy:
        return self.policy_space.validate(policy, self.num_blocks)

    def canonical(self, policy: Mapping[str, Sequence[int]]) -> Policy:
        return self.validate(policy)

    def config_key(self, policy: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...], ...]:
        checked = self.validate(policy)
        return tuple(tuple(checked[key]) for key in POLICY_KEYS)

    @property
    def encoding_size(self) -> int:
        return self.policy_space.encoding_size(self.num_blocks)

    def encode(self, policy: Mapping[str, Sequence[int]]) -> list[float]:
        return self.policy_space.encode(policy, [True] * self.num_blocks)

    def decode(self, vector: Sequence[float]) -> Policy:
        """Inverse of :meth:`encode`."""
        if len(vector) != self.encoding_size:
            raise ValueError(f"encoding must have {self.encoding_size} entries, got {len(vector)}")
        choices = self.policy_space.bit_choices
        width = len(choices)
        policy: Policy = {key: [] for key in POLICY_KEYS}
        offset = 0
        for block in range(self.num_blocks):
            for key in POLICY_KEYS:
                hot = [i for i, v in enumerate(vector[offset : offset + width]) if v > 0.5]
                if len(hot) != 1:
                    raise ValueError(f"encoding of block {block} '{key}' is not one-hot")
                policy[key].append(choices[hot[0]])
                offset += width
        return policy

    def smallest(self) -> Policy:
        return self.policy_space.uniform(min(self.policy_space.bit_choices), self.num_blocks)

    def largest(self) -> Policy:
        return self.policy_space.uniform(max(self.policy_space.bit_choices), self.num_blocks)
