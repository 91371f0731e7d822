r"""An analytic mixed-precision accelerator in the spirit of BitFusion: latency and energy per layer.

BitFusion (Sharma et al., ISCA 2018) builds its systolic array from *BitBricks*, 2-bit x 2-bit
multipliers; a *fusion unit* of 16 bricks fuses them to one 8x8-bit multiply, two 8x4-bit or four
4x4-bit multiplies per cycle, so the work of a multiply-accumulate scales with the product of the
operand widths. APQ uses a latency / energy lookup table of such an accelerator as its hardware
constraint. This module is a closed-form model of that kind of machine, so that tables are never
needed: every quantity below is a function of a layer's shape (:class:`LayerSpec`) and its weight
and activation bits, and every constant is a constructor argument (set in recipes).

Per layer, with ``w``/``a`` the weight/activation bits, ``bb`` the brick width (2):

* **bricks per MAC**: ``n(w, a) = ceil(w / bb) * ceil(a / bb)`` (an 8x8 MAC takes 16 bricks, 4x4
  takes 4, full-precision 32x32 takes 256).
* **MACs per fusion unit per cycle**: ``p = bricks_per_unit / n`` (fractional below 1: a wide
  multiply is spread over several cycles; above 1 the unit runs several narrow multiplies).
* **mapping**: the array has ``rows x cols`` fusion units; columns hold output channels, rows
  hold the reduction (input channels per group x k x k), so a layer with ``C_out`` outputs,
  reduction length ``R = C_in / groups * k^2`` and ``P = out_size^2 * batch`` output pixels takes
  ``compute = P * ceil(C_out / cols) * ceil(R / (rows * p))`` cycles. Depthwise layers
  (``R = k^2``) use a small fraction of the rows: they are as inefficient here as on real arrays.
* **memory**: DRAM traffic in bytes, ``weights * w / 8 + inputs * a / 8 * refetch + outputs * a / 8``,
  where ``refetch = ceil(weight bytes / weight buffer)`` counts the passes over the input when the
  weights do not fit on chip (outputs are written at the layer's activation width);
  ``memory = traffic / dram_bytes_per_cycle`` cycles.
* **latency**: compute and memory overlap (double buffering), so
  ``cycles = max(compute, memory) + layer_overhead_cycles`` and ``latency_ms = cycles / (frequency_mhz * 1e3)``.
* **energy** (mJ): ``MACs * n(w, a) * brick_pj`` (arithmetic) ``+ MACs * (w + a) / array_reuse * sram_pj_per_bit``
  (on-chip buffer reads, each operand fetched once per ``array_reuse`` uses) ``+ traffic * 8 * dram_pj_per_bit``
  ``+ static_mw * latency_ms * 1e-3``, all pJ -> mJ.

Both latency and energy are non-decreasing in the bits and in every shape dimension of a layer;
a network's cost is the sum over its layers. Defaults: a 32 x 16 array of 16-brick units at 500 MHz
(BitFusion's 512 units), 16 bytes per cycle of DRAM bandwidth, 64 KiB of weight buffer, energies
of a 45 nm process (Horowitz, ISSCC 2014: ~0.2 pJ for an 8-bit multiply, ~20 pJ per DRAM bit).

This module must not import torch (search scoring runs on it); numpy is used for batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_nas.spaces.layers import LayerSpec

__all__ = ["BitFusionModel", "LayerCost"]


@dataclass(frozen=True)
class LayerCost:
    latency_ms: float
    energy_mj: float
    compute_cycles: float
    memory_cycles: float
    dram_bytes: float


class BitFusionModel:
    """Latency and energy of layers on a BitFusion-like accelerator (formulas in the module docstring).

    Args:
        rows: fusion units along the reduction dimension.
        cols: fusion units along the output-channel dimension.
        bricks_per_unit: 2-bit bricks fused into one unit (16: one 8x8 multiply per cycle).
        brick_bits: operand width of one brick; bits are rounded up to multiples of it.
        frequency_mhz: clock.
        dram_bytes_per_cycle: off-chip bandwidth.
        weight_buffer_kib: on-chip weight buffer; larger weight sets re-read the input.
        layer_overhead_cycles: fixed cost per layer (configuration, pipeline fill).
        batch_size: images per inference.
        brick_pj: energy of one brick operation.
        sram_pj_per_bit: energy of one on-chip buffer bit read.
        array_reuse: uses of an operand per buffer read in the array.
        dram_pj_per_bit: energy of one DRAM bit transferred.
        static_mw: leakage and clock power while a layer runs.
    """

    def __init__(
        self,
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
        positive = {
            "rows": rows, "cols": cols, "bricks_per_unit": bricks_per_unit, "brick_bits": brick_bits,
            "frequency_mhz": frequency_mhz, "dram_bytes_per_cycle": dram_bytes_per_cycle,
            "weight_buffer_kib": weight_buffer_kib, "batch_size": batch_size, "array_reuse": array_reuse,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"accelerator parameter {name} must be positive, got {value!r}")
        non_negative = {
            "layer_overhead_cycles": layer_overhead_cycles, "brick_pj": brick_pj, "sram_pj_per_bit": sram_pj_per_bit,
            "dram_pj_per_bit": dram_pj_per_bit, "static_mw": static_mw,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"accelerator parameter {name} must be >= 0, got {value!r}")
        self.rows = int(rows)
        self.cols = int(cols)
        self.bricks_per_unit = int(bricks_per_unit)
        self.brick_bits = int(brick_bits)
        self.frequency_mhz = float(frequency_mhz)
        self.dram_bytes_per_cycle = float(dram_bytes_per_cycle)
        self.weight_buffer_bytes = float(weight_buffer_kib) * 1024.0
        self.layer_overhead_cycles = float(layer_overhead_cycles)
        self.batch_size = int(batch_size)
        self.brick_pj = float(brick_pj)
        self.sram_pj_per_bit = float(sram_pj_per_bit)
        self.array_reuse = float(array_reuse)
        self.dram_pj_per_bit = float(dram_pj_per_bit)
        self.static_mw = float(static_mw)

    def bricks(self, weight_bits: int, activation_bits: int) -> int:
        """Bricks one multiply of these widths occupies."""
        return math.ceil(weight_bits / self.brick_bits) * math.ceil(activation_bits / self.brick_bits)

    def layer_costs(
        self, specs: Sequence[LayerSpec], weight_bits: np.ndarray | Sequence[int], activation_bits: np.ndarray | Sequence[int]
    ) -> dict[str, np.ndarray]:
        """Vectorised costs: ``specs[i]`` at ``weight_bits[..., i]`` / ``activation_bits[..., i]``.

        The bit arrays may carry leading batch dimensions (e.g. (N, L) for N bit assignments of L
        layers). Returns ``latency_ms``, ``energy_mj``, ``compute_cycles``, ``memory_cycles`` and
        ``dram_bytes`` arrays of the bits' shape.
        """
        w = np.asarray(weight_bits, dtype=np.float64)
        a = np.asarray(activation_bits, dtype=np.float64)
        if w.shape[-1:] != (len(specs),) or a.shape != w.shape:
            raise ValueError(f"bits arrays must end with one entry per layer ({len(specs)}), got {w.shape} and {a.shape}")
        shape = _ShapeArrays(specs)
        bricks = np.ceil(w / self.brick_bits) * np.ceil(a / self.brick_bits)
        per_unit = self.bricks_per_unit / bricks  # MACs per fusion unit per cycle
        pixels = shape.out_size**2 * self.batch_size
        compute = pixels * np.ceil(shape.out_channels / self.cols) * np.ceil(shape.reduction / (self.rows * per_unit))
        weight_bytes = shape.weights * w / 8.0
        refetch = np.maximum(1.0, np.ceil(weight_bytes / self.weight_buffer_bytes))
        input_bytes = shape.inputs * self.batch_size * a / 8.0
        output_bytes = shape.outputs * self.batch_size * a / 8.0
        traffic = weight_bytes + input_bytes * refetch + output_bytes
        memory = traffic / self.dram_bytes_per_cycle
        cycles = np.maximum(compute, memory) + self.layer_overhead_cycles
        latency_ms = cycles / (self.frequency_mhz * 1e3)
        macs = shape.macs * self.batch_size
        energy_pj = (
            macs * bricks * self.brick_pj
            + macs * (w + a) / self.array_reuse * self.sram_pj_per_bit
            + traffic * 8.0 * self.dram_pj_per_bit
        )
        energy_mj = energy_pj * 1e-9 + self.static_mw * latency_ms * 1e-3  # pJ -> mJ; mW x ms = uJ
        return {"latency_ms": latency_ms, "energy_mj": energy_mj, "compute_cycles": compute,
                "memory_cycles": memory, "dram_bytes": traffic}

    def layer_cost(self, spec: LayerSpec, weight_bits: int, activation_bits: int) -> LayerCost:
        """Costs of one layer."""
        out = self.layer_costs([spec], [weight_bits], [activation_bits])
        return LayerCost(**{key: float(value[0]) for key, value in
                            (("latency_ms", out["latency_ms"]), ("energy_mj", out["energy_mj"]),
                             ("compute_cycles", out["compute_cycles"]), ("memory_cycles", out["memory_cycles"]),
                             ("dram_bytes", out["dram_bytes"]))})

    def network_cost(
        self, specs: Sequence[LayerSpec], bits: dict[str, tuple[int, int]]
    ) -> tuple[float, float]:
        """``(latency_ms, energy_mj)`` of a network: the sum over its layers."""
        if not specs:
            return 0.0, 0.0
        w = [bits[s.name][0] for s in specs]
        a = [bits[s.name][1] for s in specs]
        out = self.layer_costs(specs, w, a)
        return float(out["latency_ms"].sum()), float(out["energy_mj"].sum())

    def __repr__(self) -> str:
        return (f"BitFusionModel(rows={self.rows}, cols={self.cols}, bricks_per_unit={self.bricks_per_unit}, "
                f"frequency_mhz={self.frequency_mhz}, dram_bytes_per_cycle={self.dram_bytes_per_cycle})")


class _ShapeArrays:
    """Per-layer shape quantities of a list of specs as float arrays."""

    def __init__(self, specs: Sequence[LayerSpec]) -> None:
        def column(fn) -> np.ndarray:  # noqa: ANN001 - a small local accessor
            return np.asarray([fn(s) for s in specs], dtype=np.float64)

        self.out_channels = column(lambda s: s.out_channels)
        self.reduction = column(lambda s: (s.in_channels // s.groups) * s.kernel_size**2)
        self.out_size = column(lambda s: s.out_size)
        self.weights = column(lambda s: s.weight_count)
        self.inputs = column(lambda s: s.in_channels * s.in_size**2)
        self.outputs = column(lambda s: s.out_channels * s.out_size**2)
        self.macs = column(lambda s: s.macs)
