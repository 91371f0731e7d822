"""Counts of a network from its config alone: MACs, parameters, BitOps and model size.

Nothing is built: everything is read from the space's :class:`~lightning_nas.spaces.layers.LayerSpec`
list (``space.layer_specs(config)``) and, for mixed precision, from the bit widths that
:meth:`QuantPolicySpace.bits_for_layers <lightning_nas.spaces.quant_policy.QuantPolicySpace.bits_for_layers>`
binds to every layer. Definitions:

* **MACs**: multiply-accumulates of one image through the convolution and linear layers.
* **params**: trainable parameters, ``space.params(config)`` (every
  :class:`~lightning_nas.spaces.protocol.CostModelSpace` defines it; the OFA and ProxylessNAS
  spaces add the batch-norm affine parameters to the conv / linear weights and biases).
* **BitOps**: ``sum over layers of MACs x weight bits x activation bits``; without a policy every
  layer is full precision (32 x 32).
* **size_bytes**: storage of the parameters: every conv / linear weight at its layer's weight
  bits, everything else (biases, batch-norm parameters) as 32-bit floats.

:func:`count_network` is the readable per-config definition. :class:`CountTable` gives the same
numbers for thousands of candidates at once: an elastic (once-for-all style) candidate is its fixed
layers plus the layers of its running blocks, and a block's layers depend only on the resolution
and the block's own kernel and expand ratio, so their counts are tabulated once per
``(resolution, block, kernel, expand)`` and a batch of candidates becomes a few array gathers.

This module must not import torch: search scoring and recipe validation use it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.protocol import CostModelSpace, ElasticSpace
from lightning_nas.spaces.quant_policy import FULL_PRECISION_BITS, POLICY_KEYS, ROLE_TO_KIND, QuantPolicySpace

__all__ = [
    "BYTES_PER_FLOAT",
    "COUNT_METRICS",
    "BlockDecomposition",
    "CandidateArrays",
    "CountTable",
    "Counts",
    "PolicyArrays",
    "count_layers",
    "count_network",
    "layer_bits",
    "policy_kind",
]

#: Bytes of a parameter that is not quantized (biases, batch norm): float32.
BYTES_PER_FLOAT = 4
#: Metric names, in the order :class:`CountTable` reports them.
COUNT_METRICS: tuple[str, ...] = ("macs", "params", "bitops", "size_bytes")


@dataclass(frozen=True)
class Counts:
    macs: int
    params: int
    bitops: int
    size_bytes: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def layer_bits(
    specs: Sequence[LayerSpec],
    policy: Mapping[str, Sequence[int]] | None = None,
    policy_space: QuantPolicySpace | None = None,
) -> dict[str, tuple[int, int]]:
    """``(weight_bits, activation_bits)`` of every layer: 32/32 without a policy."""
    if policy is None:
        return {spec.name: (FULL_PRECISION_BITS, FULL_PRECISION_BITS) for spec in specs}
    return (policy_space or QuantPolicySpace()).bits_for_layers(specs, policy)


def count_layers(
    specs: Sequence[LayerSpec], bits: Mapping[str, tuple[int, int]], params: int | None = None
) -> Counts:
    """Counts of a list of layers with the given bits; ``params`` (when the network has parameters
    outside its conv / linear layers, e.g. batch norm) replaces the layers' own parameter count."""
    macs = sum(spec.macs for spec in specs)
    layer_params = sum(spec.params for spec in specs)
    total_params = layer_params if params is None else int(params)
    weights = sum(spec.weight_count for spec in specs)
    bitops = sum(spec.macs * bits[spec.name][0] * bits[spec.name][1] for spec in specs)
    weight_bits = sum(spec.weight_count * bits[spec.name][0] for spec in specs)
    size = weight_bits / 8 + (total_params - weights) * BYTES_PER_FLOAT
    return Counts(macs=int(macs), params=int(total_params), bitops=int(bitops), size_bytes=float(size))


def count_network(
    space: CostModelSpace,
    config: Mapping[str, Any],
    policy: Mapping[str, Sequence[int]] | None = None,
    policy_space: QuantPolicySpace | None = None,
    resolution: int | None = None,
) -> Counts:
    """MACs, parameters, BitOps and size of one subnet (see the module docstring)."""
    specs = space.layer_specs(config, resolution)
    return count_layers(specs, layer_bits(specs, policy, policy_space), space.params(config))


# --------------------------------------------------------------------------- batched candidates


@dataclass
class CandidateArrays:
    """A batch of elastic configs as index arrays (``N`` candidates, ``B`` blocks)."""

    resolution: np.ndarray  # (N,) index into space.resolutions
    kernel: np.ndarray  # (N, B) index into space.kernel_choices
    expand: np.ndarray  # (N, B) index into space.expand_choices
    active: np.ndarray  # (N, B) bool: the block runs

    def __len__(self) -> int:
        return int(self.resolution.shape[0])


@dataclass
class PolicyArrays:
    """Bit widths of a batch of candidates: per block ``pw_w, pw_a, dw_w, dw_a`` (N, B) and the
    bits of every layer outside the policy (``fixed``, (N,)); full-precision candidates are 32."""

    pw_w: np.ndarray
    pw_a: np.ndarray
    dw_w: np.ndarray
    dw_a: np.ndarray
    fixed: np.ndarray


def _choice_lookup(choices: Sequence[int]) -> np.ndarray:
    lookup = np.full(max(choices) + 1, -1, dtype=np.int64)
    lookup[np.asarray(choices)] = np.arange(len(choices))
    return lookup


def _indices(values: np.ndarray, choices: Sequence[int], what: str) -> np.ndarray:
    """Map ``values`` to indices of ``choices``; a ValueError names the first bad candidate."""
    lookup = _choice_lookup(choices)
    inside = (values >= 0) & (values < lookup.shape[0])
    index = np.where(inside, lookup[np.clip(values, 0, lookup.shape[0] - 1)], -1)
    if (index < 0).any():
        where = np.argwhere(index < 0)[0]
        raise ValueError(
            f"candidate {int(where[0])}: {what}{list(where[1:].tolist()) or ''} = {int(values[tuple(where)])} "
            f"is not allowed; choose from {list(choices)}"
        )
    return index


def _stack(rows: list[Any], width: int, what: str) -> np.ndarray:
    try:
        array = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be lists of {width} ints for every candidate ({error})") from None
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{what} must have {width} entries for every candidate, got shape {array.shape}")
    return array


class BlockDecomposition:
    """An elastic space's candidates as fixed layers plus per-block layer groups.

    For a once-for-all style space (an :class:`~lightning_nas.spaces.protocol.ElasticSpace`:
    configs ``{ks, e, d, r}``, ``stage_blocks``, ``active_blocks``, ...) this tabulates, once, the :class:`LayerSpec` list of the fixed layers per
    resolution (``fixed[ri]``) and of every block per resolution, kernel and expand ratio
    (``block_layers[ri][b][ki][ei]``). The decomposition is checked against ``layer_specs`` of a few
    whole configs, so a space where a block's shapes depend on other blocks is refused.
    """

    def __init__(self, space: ElasticSpace, check_samples: int = 3) -> None:
        self.space = space
        self.resolutions: list[int] = list(space.resolutions)
        self.kernels: list[int] = list(space.kernel_choices)
        self.expands: list[int] = list(space.expand_choices)
        self.num_blocks: int = int(space.num_blocks)
        self.num_stages: int = int(space.num_stages)
        stage_of = np.zeros(self.num_blocks, dtype=np.int64)
        position_of = np.zeros(self.num_blocks, dtype=np.int64)
        for s in range(self.num_stages):
            for p, b in enumerate(space.stage_blocks(s)):
                stage_of[b], position_of[b] = s, p
        self.stage_of, self.position_of = stage_of, position_of

        self.fixed: list[list[LayerSpec]] = []
        self.block_layers: list[list[list[list[list[LayerSpec]]]]] = []
        for r in self.resolutions:
            per_block: list[list[list[list[LayerSpec]]]] = [
                [[[] for _ in self.expands] for _ in self.kernels] for _ in range(self.num_blocks)
            ]
            fixed: list[LayerSpec] | None = None
            for ki, k in enumerate(self.kernels):
                for ei, e in enumerate(self.expands):
                    config = {"ks": [k] * self.num_blocks, "e": [e] * self.num_blocks,
                              "d": [space.max_depth] * self.num_stages, "r": r}
                    groups = self._group(space.layer_specs(config))
                    per_block_specs = groups.pop(None, [])
                    if fixed is None:
                        fixed = per_block_specs
                    elif fixed != per_block_specs:
                        raise ValueError(f"{type(space).__name__}: the fixed layers change with the blocks' choices")
                    for b in range(self.num_blocks):
                        per_block[b][ki][ei] = groups.get(b, [])
            self.fixed.append(fixed or [])
            self.block_layers.append(per_block)
        self._check(check_samples)

    @staticmethod
    def _group(specs: Sequence[LayerSpec]) -> dict[int | None, list[LayerSpec]]:
        groups: dict[int | None, list[LayerSpec]] = {}
        for spec in specs:
            groups.setdefault(spec.block, []).append(spec)
        return groups

    def layers(self, config: Mapping[str, Any]) -> list[LayerSpec]:
        """The layers of ``config`` assembled from the tables (equal to ``space.layer_specs``)."""
        ri = self.resolutions.index(config["r"])
        out = list(self.fixed[ri])
        for b in self.space.active_blocks(config):
            out += self.block_layers[ri][b][self.kernels.index(config["ks"][b])][self.expands.index(config["e"][b])]
        return out

    def _check(self, samples: int) -> None:
        rng = random.Random(0)
        configs = [self.space.smallest(), self.space.largest()] + [self.space.sample(rng) for _ in range(samples)]
        for config in configs:
            expected = sorted(self.space.layer_specs(config), key=lambda s: s.name)
            if sorted(self.layers(config), key=lambda s: s.name) != expected:
                raise ValueError(
                    f"{type(self.space).__name__} is not block-decomposable: a block's layers depend on "
                    "other blocks' choices, so per-block cost tables would be wrong"
                )

    # ------------------------------------------------------------------ batches

    def encode(self, configs: Sequence[Mapping[str, Any]]) -> CandidateArrays:
        """Validate a batch of configs and turn it into index arrays (vectorised)."""
        n = len(configs)
        if n == 0:
            empty = np.zeros((0, self.num_blocks), dtype=np.int64)
            return CandidateArrays(np.zeros(0, dtype=np.int64), empty, empty, empty.astype(bool))
        try:
            ks = [c["ks"] for c in configs]
            es = [c["e"] for c in configs]
            ds = [c["d"] for c in configs]
            rs = [c["r"] for c in configs]
        except (KeyError, TypeError) as error:
            raise ValueError(f"every candidate must be a config with keys ks, e, d, r ({error!r} missing)") from None
        resolution = _indices(np.asarray(rs, dtype=np.int64), self.resolutions, "r")
        kernel = _indices(_stack(ks, self.num_blocks, "ks"), self.kernels, "ks")
        expand = _indices(_stack(es, self.num_blocks, "e"), self.expands, "e")
        depth = _stack(ds, self.num_stages, "d")
        _indices(depth, list(self.space.depth_choices), "d")
        active = self.position_of[None, :] < depth[:, self.stage_of]
        return CandidateArrays(resolution, kernel, expand, active)

    def gather(self, table: np.ndarray, candidates: CandidateArrays) -> np.ndarray:
        """``table[ri, b, ki, ei, ...]`` for every candidate and block, zero for skipped blocks: (N, B, ...)."""
        blocks = np.arange(self.num_blocks)[None, :]
        values = table[candidates.resolution[:, None], blocks, candidates.kernel, candidates.expand]
        mask = candidates.active.reshape(candidates.active.shape + (1,) * (values.ndim - 2))
        return np.where(mask, values, 0)

    def encode_policies(
        self,
        policies: Sequence[Mapping[str, Sequence[int]] | None] | None,
        n: int,
        policy_space: QuantPolicySpace,
    ) -> PolicyArrays:
        """Bit arrays of ``n`` candidates; ``None`` (or a ``None`` entry) is full precision."""
        full = np.full((n, self.num_blocks), FULL_PRECISION_BITS, dtype=np.int64)
        if policies is None:
            return PolicyArrays(full, full, full, full, np.full(n, FULL_PRECISION_BITS, dtype=np.int64))
        if len(policies) != n:
            raise ValueError(f"got {len(policies)} policies for {n} candidates")
        given = [i for i, p in enumerate(policies) if p is not None]
        arrays = {key: full.copy() for key in POLICY_KEYS}
        fixed = np.full(n, FULL_PRECISION_BITS, dtype=np.int64)
        if given:
            for key in POLICY_KEYS:
                try:
                    rows = [policies[i][key] for i in given]  # type: ignore[index]
                except (KeyError, TypeError):
                    raise ValueError(f"quantization policy is missing key '{key}'; expected keys {list(POLICY_KEYS)}") from None
                values = _stack(rows, self.num_blocks, f"policy key '{key}'")
                _indices(values, policy_space.bit_choices, f"policy['{key}']")
                arrays[key][given] = values
            fixed[given] = policy_space.fixed_bits
        return PolicyArrays(arrays["pw_w"], arrays["pw_a"], arrays["dw_w"], arrays["dw_a"], fixed)


def policy_kind(spec: LayerSpec) -> str:
    """"pw" / "dw" for layers whose bits come from the policy's block entries, else "fixed"."""
    kind = ROLE_TO_KIND.get(spec.role)
    return "fixed" if kind is None or spec.block is None else kind


class CountTable:
    """:func:`count_network` for many candidates at once (see the module docstring).

    Per ``(resolution, block, kernel, expand)`` it stores the MACs and weight counts of the block's
    pointwise, depthwise and fixed-precision layers; the parameters outside conv / linear weights
    (biases, batch norm) come from ``space.params`` by differences, since layer specs do not list
    batch norms.
    """

    def __init__(self, space: ElasticSpace, policy_space: QuantPolicySpace | None = None) -> None:
        self.space = space
        self.policy_space = policy_space or QuantPolicySpace()
        self.decomposition = d = BlockDecomposition(space)
        shape = (len(d.resolutions), d.num_blocks, len(d.kernels), len(d.expands))
        kinds = ("pw", "dw", "fixed")
        # [..., kind] with kind 0 = pw, 1 = dw, 2 = fixed precision (e.g. squeeze-excite)
        self.block_macs = np.zeros(shape + (3,), dtype=np.int64)
        self.block_weights = np.zeros(shape + (3,), dtype=np.int64)
        self.fixed_macs = np.zeros(len(d.resolutions), dtype=np.int64)
        self.fixed_weights = np.zeros(len(d.resolutions), dtype=np.int64)
        for ri in range(shape[0]):
            self.fixed_macs[ri] = sum(s.macs for s in d.fixed[ri])
            self.fixed_weights[ri] = sum(s.weight_count for s in d.fixed[ri])
            for b in range(shape[1]):
                for ki in range(shape[2]):
                    for ei in range(shape[3]):
                        for spec in d.block_layers[ri][b][ki][ei]:
                            kind = kinds.index(policy_kind(spec))
                            self.block_macs[ri, b, ki, ei, kind] += spec.macs
                            self.block_weights[ri, b, ki, ei, kind] += spec.weight_count
        self.fixed_other, self.block_other = self._other_params()

    def _non_weight_params(self, config: Mapping[str, Any]) -> int:
        specs = self.space.layer_specs(config)
        params = self.space.params(config)
        return int(params) - sum(s.weight_count for s in specs)

    def _other_params(self) -> tuple[int, np.ndarray]:
        """Parameters that are not conv / linear weights, split into a fixed part and per-block
        parts by changing one block (or one stage's depth) at a time. They do not depend on the
        resolution. Blocks that always run fold their base amount into the fixed part."""
        d, space = self.decomposition, self.space
        k0, e0 = d.kernels[0], d.expands[0]
        base = {"ks": [k0] * d.num_blocks, "e": [e0] * d.num_blocks, "d": [space.max_depth] * d.num_stages,
                "r": d.resolutions[0]}
        q0 = self._non_weight_params(base)
        other = np.zeros((d.num_blocks, len(d.kernels), len(d.expands)), dtype=np.int64)
        for b in range(d.num_blocks):
            for ki, k in enumerate(d.kernels):
                for ei, e in enumerate(d.expands):
                    if ki == 0 and ei == 0:
                        continue
                    changed = {**base, "ks": list(base["ks"]), "e": list(base["e"])}
                    changed["ks"][b], changed["e"][b] = k, e
                    other[b, ki, ei] = self._non_weight_params(changed) - q0
        fixed = q0
        depths = sorted(space.depth_choices)
        for s in range(d.num_stages):
            blocks = list(space.stage_blocks(s))
            for shallow, deep in zip(depths, depths[1:]):
                lower = {**base, "d": [space.max_depth] * d.num_stages}
                upper = {**base, "d": [space.max_depth] * d.num_stages}
                lower["d"][s], upper["d"][s] = shallow, deep
                # blocks shallow..deep-1 switch on together; the first of them carries the amount
                level = self._non_weight_params(upper) - self._non_weight_params(lower)
                other[blocks[shallow]] += level
                fixed -= level
        return int(fixed), other

    @property
    def metrics(self) -> tuple[str, ...]:
        return COUNT_METRICS

    def evaluate(
        self,
        configs: Sequence[Mapping[str, Any]],
        policies: Sequence[Mapping[str, Sequence[int]] | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{"macs", "params", "bitops", "size_bytes"}`` arrays, one entry per candidate."""
        d = self.decomposition
        candidates = d.encode(configs)
        bits = d.encode_policies(policies, len(candidates), self.policy_space)
        ri = candidates.resolution
        macs = d.gather(self.block_macs, candidates)  # (N, B, 3)
        weights = d.gather(self.block_weights, candidates)
        other = np.where(candidates.active, self.block_other[np.arange(d.num_blocks)[None, :],
                                                             candidates.kernel, candidates.expand], 0)
        fixed_bits = bits.fixed[:, None]
        total_macs = self.fixed_macs[ri] + macs.sum(axis=(1, 2))
        params = self.fixed_weights[ri] + weights.sum(axis=(1, 2)) + self.fixed_other + other.sum(axis=1)
        bitops = (
            (macs[..., 0] * bits.pw_w * bits.pw_a).sum(axis=1)
            + (macs[..., 1] * bits.dw_w * bits.dw_a).sum(axis=1)
            + (macs[..., 2] * fixed_bits * fixed_bits).sum(axis=1)
            + self.fixed_macs[ri] * bits.fixed * bits.fixed
        )
        weight_bits = (
            (weights[..., 0] * bits.pw_w).sum(axis=1)
            + (weights[..., 1] * bits.dw_w).sum(axis=1)
            + (weights[..., 2] * fixed_bits).sum(axis=1)
            + self.fixed_weights[ri] * bits.fixed
        )
        non_weights = self.fixed_other + other.sum(axis=1)
        size = weight_bits / 8 + non_weights * BYTES_PER_FLOAT
        return {"macs": total_macs, "params": params, "bitops": bitops, "size_bytes": size.astype(np.float64)}
