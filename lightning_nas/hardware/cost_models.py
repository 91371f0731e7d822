"""One interface for every hardware cost model, chosen in recipes and evaluated in batches.

A cost model has ``metrics`` (the names of what it returns) and
``evaluate(configs, policies=None) -> {metric: numpy array}`` with one entry per candidate.
``policies`` is ``None`` (every candidate in full precision) or one APQ quantization policy (or
``None``) per candidate. Recipes name a model under ``cost_models`` (registry ``cost_model``)::

    cost_models:
      - {name: counts, space: ${space}}
      - {name: latency_table, space: ${space}, table: runs/profile/latency_table.json, precision: int8}
      - {name: bitfusion, space: ${space}, frequency_mhz: 500}

Every model tabulates per-block costs once (per resolution, block, kernel and expand ratio, and
for bit-dependent costs per bit width) so that a batch of candidates costs a few numpy gathers:
search strategies score tens of thousands of candidates per second.

Metrics: ``macs``, ``params``, ``bitops``, ``size_bytes`` (:class:`CountsCostModel`),
``latency_ms`` (:class:`LatencyTableCostModel`, measured on a CPU), ``latency_ms`` and
``energy_mj`` (:class:`BitFusionCostModel`, an analytic mixed-precision accelerator).

This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lightning_nas.errors import RecipeError
from lightning_nas.hardware.accelerator import BitFusionModel
from lightning_nas.hardware.counts import COUNT_METRICS, BlockDecomposition, CountTable, policy_kind
from lightning_nas.hardware.latency_keys import UnitDecomposition
from lightning_nas.hardware.latency_model import TableLatencyModel
from lightning_nas.hardware.latency_table import PRECISIONS, LatencyTable
from lightning_nas.recipe.markers import BitChoices, ExistingFile, FixedBits, SpaceSpec
from lightning_nas.spaces.protocol import ElasticSpace
from lightning_nas.spaces.quant_policy import FULL_PRECISION_BITS, QuantPolicySpace

__all__ = [
    "BitFusionCostModel",
    "CostModel",
    "CountsCostModel",
    "LatencyTableCostModel",
    "build_space",
    "evaluate_all",
]

Configs = Sequence[Mapping[str, Any]]
Policies = Sequence[Mapping[str, Sequence[int]] | None] | None


def build_space(space: SpaceSpec | ElasticSpace) -> ElasticSpace:
    """A space object from a recipe spec ``{name: ..., **arguments}`` (or a space object as is).

    The cost models tabulate costs block by block, so the space must be elastic (once-for-all
    style); any other space is the recipe's mistake.
    """
    built = space
    if isinstance(space, Mapping):
        from lightning_nas.registry import SPACES

        built = SPACES.build(space)
    if not isinstance(built, ElasticSpace):
        raise RecipeError(f"cost models price once-for-all style spaces (kernel, expand, depth and resolution "
                          f"per block), not {type(built).__name__}", key="space",
                          given=dict(space) if isinstance(space, Mapping) else repr(space),
                          allowed="an elastic space, e.g. ofa_mbv3 or ofa_mbv3_cifar")
    return built


class CostModel:
    """Base of all cost models: ``metrics`` and a batched ``evaluate``."""

    metrics: tuple[str, ...] = ()

    def evaluate(self, configs: Configs, policies: Policies = None) -> dict[str, np.ndarray]:
        """One array per metric, one entry per candidate (``policies``: see the module docstring)."""
        raise NotImplementedError

    def evaluate_one(self, config: Mapping[str, Any], policy: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
        out = self.evaluate([config], None if policy is None else [policy])
        return {key: float(value[0]) for key, value in out.items()}


def evaluate_all(models: Sequence[CostModel], configs: Configs, policies: Policies = None) -> dict[str, np.ndarray]:
    """Evaluate several models and merge their metrics; two models reporting one metric is an error."""
    merged: dict[str, np.ndarray] = {}
    for model in models:
        for key, value in model.evaluate(configs, policies).items():
            if key in merged:
                raise ValueError(f"two cost models report '{key}'; keep one of them")
            merged[key] = value
    return merged


class CountsCostModel(CostModel):
    """MACs, parameters, BitOps and model size in bytes (see :mod:`lightning_nas.hardware.counts`).

    Args:
        space: the search space spec (``{name: ofa_mbv3_cifar, ...}``).
        bit_choices: bit widths a policy may use (APQ: 4, 6, 8).
        fixed_bits: bits of the layers outside the policy when a candidate is quantized.
    """

    metrics = COUNT_METRICS

    def __init__(
        self,
        space: SpaceSpec,
        bit_choices: BitChoices = [4, 6, 8],  # noqa: B006 - copied by QuantPolicySpace
        fixed_bits: FixedBits = 8,
    ) -> None:
        self.space = build_space(space)
        self.policy_space = QuantPolicySpace(bit_choices=bit_choices, fixed_bits=fixed_bits)
        self.table = CountTable(self.space, self.policy_space)

    def evaluate(self, configs: Configs, policies: Policies = None) -> dict[str, np.ndarray]:
        return self.table.evaluate(configs, policies)


class LatencyTableCostModel(CostModel):
    """Latency (ms per batch) from a measured table: the sum of a network's units.

    Args:
        space: the search space spec.
        table: a table written by ``lightning-nas profile`` (JSON) or a once-for-all YAML table.
        precision: ``fp32``, ``int8``, or ``auto`` (int8 for candidates with a quantization policy,
            fp32 for the others; CPUs run any policy with 8-bit kernels).
        stat: ``median`` or ``mean`` of the measured repeats.
        resolutions: the resolutions the table covers, when it does not cover all of the space's.
        correction: apply the learned correction of the sum the table carries where ``lightning-nas
            profile`` marked it applied (``profile.correction_subnets``); false: the plain sum.

    ``target`` is the deployment target the table was timed for (searches refuse to combine it with
    another, :func:`~lightning_nas.targets.check_same_target`); ``validation`` the table's
    whole-subnet check (:mod:`~lightning_nas.hardware.latency_validation`), with the held-out
    figures of the correction where the table carries one.
    """

    metrics = ("latency_ms",)

    def __init__(
        self,
        space: SpaceSpec,
        table: ExistingFile,
        precision: Literal["fp32", "int8", "auto"] = "fp32",
        stat: Literal["median", "mean"] = "median",
        resolutions: list[int] | None = None,
        correction: bool = True,
    ) -> None:
        if precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"precision {precision!r} must be one of {[*PRECISIONS, 'auto']}")
        if stat not in ("median", "mean"):
            raise ValueError(f"stat {stat!r} must be 'median' or 'mean'")
        self.space = build_space(space)
        self.precision = precision
        # OFA YAML tables carry one precision: read them as the one asked for (fp32 for auto)
        loaded = LatencyTable.load(table, "fp32" if precision == "auto" else precision)
        #: the deployment target the table was measured for (None: a table from before targets)
        self.target: str | None = loaded.meta.get("target") if isinstance(loaded.meta, dict) else None
        wanted = list(PRECISIONS) if precision == "auto" else [precision]
        units = UnitDecomposition(self.space)
        self.models = {p: TableLatencyModel(self.space, loaded, precision=p, stat=stat, resolutions=resolutions,
                                            units=units, correction=correction) for p in wanted}

    @property
    def validation(self) -> dict[str, Any]:
        """The table's whole-subnet validation per precision used (None for a precision whose table
        was not validated), carried into search outputs."""
        return {p: model.validation for p, model in self.models.items()}

    def evaluate(self, configs: Configs, policies: Policies = None) -> dict[str, np.ndarray]:
        if self.precision != "auto":
            return {"latency_ms": self.models[self.precision].evaluate(configs)}
        quantized = np.zeros(len(configs), dtype=bool) if policies is None else np.array(
            [p is not None for p in policies], dtype=bool)
        if policies is not None and len(policies) != len(configs):
            raise ValueError(f"got {len(policies)} policies for {len(configs)} candidates")
        out = self.models["fp32"].evaluate(configs)
        if quantized.any():
            out = np.where(quantized, self.models["int8"].evaluate(configs), out)
        return {"latency_ms": out}


class BitFusionCostModel(CostModel):
    """Latency (ms) and energy (mJ) on the analytic BitFusion-like accelerator of
    :mod:`lightning_nas.hardware.accelerator` (the formulas and the meaning of every argument are
    documented there). Candidates without a policy run every layer at 32 bits.

    Args:
        space: the search space spec.
        bit_choices: bit widths a policy may use.
        fixed_bits: bits of the layers outside the policy when a candidate is quantized.
    """

    metrics = ("latency_ms", "energy_mj")

    def __init__(
        self,
        space: SpaceSpec,
        bit_choices: BitChoices = [4, 6, 8],  # noqa: B006 - copied by QuantPolicySpace
        fixed_bits: FixedBits = 8,
        rows: int = 32,
        cols: int = 16,
        bricks_per_unit: int = 16,
        brick_bits: int = 2,
        frequency_mhz: float = 500.0,
        dram_bytes_per_cycle: float = 16.0,
        weight_buffer_kib: float = 64.0,
        layer_overhead_cycles: float = 100.0,
        batch_size: int = 1,
        brick_pj: float = 0.015,
        sram_pj_per_bit: float = 0.1,
        array_reuse: float = 16.0,
        dram_pj_per_bit: float = 20.0,
        static_mw: float = 50.0,
    ) -> None:
        self.space = build_space(space)
        self.policy_space = QuantPolicySpace(bit_choices=bit_choices, fixed_bits=fixed_bits)
        self.accelerator = BitFusionModel(
            rows=rows, cols=cols, bricks_per_unit=bricks_per_unit, brick_bits=brick_bits,
            frequency_mhz=frequency_mhz, dram_bytes_per_cycle=dram_bytes_per_cycle,
            weight_buffer_kib=weight_buffer_kib, layer_overhead_cycles=layer_overhead_cycles,
            batch_size=batch_size, brick_pj=brick_pj, sram_pj_per_bit=sram_pj_per_bit, array_reuse=array_reuse,
            dram_pj_per_bit=dram_pj_per_bit, static_mw=static_mw,
        )
        self.decomposition = d = BlockDecomposition(self.space)
        self.bits = sorted({*self.policy_space.bit_choices, self.policy_space.fixed_bits, FULL_PRECISION_BITS})
        self._bit_index = np.full(max(self.bits) + 1, -1, dtype=np.int64)
        self._bit_index[self.bits] = np.arange(len(self.bits))
        nb = len(self.bits)
        shape = (len(d.resolutions), d.num_blocks, len(d.kernels), len(d.expands))
        # [..., metric, w index, a index] for the pointwise / depthwise layers of each block;
        # [..., metric, bits index] for layers that run at one width (squeeze-excite, fixed layers)
        self.pw = np.zeros(shape + (2, nb, nb))
        self.dw = np.zeros(shape + (2, nb, nb))
        self.block_fixed = np.zeros(shape + (2, nb))
        self.fixed = np.zeros((len(d.resolutions), 2, nb))
        grid_w, grid_a = np.meshgrid(self.bits, self.bits, indexing="ij")
        same = np.asarray(self.bits)
        for ri in range(shape[0]):
            self.fixed[ri] = self._cost(d.fixed[ri], same, same)
            for b in range(shape[1]):
                for ki in range(shape[2]):
                    for ei in range(shape[3]):
                        layers = d.block_layers[ri][b][ki][ei]
                        groups: dict[str, list] = {"pw": [], "dw": [], "fixed": []}
                        for spec in layers:
                            groups[policy_kind(spec)].append(spec)
                        where = (ri, b, ki, ei)
                        self.pw[where] = self._cost(groups["pw"], grid_w, grid_a)
                        self.dw[where] = self._cost(groups["dw"], grid_w, grid_a)
                        self.block_fixed[where] = self._cost(groups["fixed"], same, same)

    def _cost(self, specs: list, weight_bits: np.ndarray, activation_bits: np.ndarray) -> np.ndarray:
        """Summed (latency, energy) of ``specs`` for every entry of the bit arrays: (2, *bits.shape)."""
        shape = np.shape(weight_bits)
        if not specs:
            return np.zeros((2, *shape))
        w = np.repeat(np.asarray(weight_bits, dtype=np.float64)[..., None], len(specs), axis=-1)
        a = np.repeat(np.asarray(activation_bits, dtype=np.float64)[..., None], len(specs), axis=-1)
        out = self.accelerator.layer_costs(specs, w, a)
        return np.stack([out["latency_ms"].sum(axis=-1), out["energy_mj"].sum(axis=-1)])

    def evaluate(self, configs: Configs, policies: Policies = None) -> dict[str, np.ndarray]:
        d = self.decomposition
        candidates = d.encode(configs)
        bits = d.encode_policies(policies, len(candidates), self.policy_space)
        index = self._bit_index
        ri = candidates.resolution[:, None]
        blocks = np.arange(d.num_blocks)[None, :]
        at = (ri, blocks, candidates.kernel, candidates.expand)
        fixed_index = index[bits.fixed]
        total = np.zeros((2, len(candidates)))
        for metric in range(2):
            pw = self.pw[at + (metric, index[bits.pw_w], index[bits.pw_a])]
            dw = self.dw[at + (metric, index[bits.dw_w], index[bits.dw_a])]
            block_fixed = self.block_fixed[at + (metric, fixed_index[:, None])]
            per_block = np.where(candidates.active, pw + dw + block_fixed, 0.0)
            total[metric] = per_block.sum(axis=1) + self.fixed[candidates.resolution, metric, fixed_index]
        return {"latency_ms": total[0], "energy_mj": total[1]}
