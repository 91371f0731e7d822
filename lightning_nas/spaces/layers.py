"""The shape description every cost model consumes.

A search space turns an architecture config into a list of :class:`LayerSpec` (one per
convolution or linear layer, in execution order) without building a network. Counts, latency
tables and the accelerator model all read these, so a new space only has to describe its
layers once. This module must stay importable without torch: recipe validation and search
scoring run on it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Roles a layer can play. Quantization policies bind bit widths to roles: APQ gives every
#: elastic block a pointwise (``pw_expand``/``pw_project``) and a depthwise (``dw``) pair of
#: weight/activation bits; the remaining roles are fixed-precision layers.
LAYER_ROLES = (
    "stem",
    "pw_expand",
    "dw",
    "pw_project",
    "se_reduce",
    "se_expand",
    "head",
    "classifier",
    "other",
)


@dataclass(frozen=True)
class LayerSpec:
    """One convolution or linear layer of a concrete network.

    Spatial sizes are square (``in_size`` x ``in_size`` input). A linear layer is described as a
    1x1 convolution on a 1x1 map (``op == "linear"``).
    """

    name: str
    op: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    in_size: int
    out_size: int
    bias: bool
    role: str = "other"
    block: int | None = None  # index of the elastic block the layer belongs to, if any

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass for one image."""
        per_output = (self.in_channels // self.groups) * self.kernel_size * self.kernel_size
        return per_output * self.out_channels * self.out_size * self.out_size

    @property
    def params(self) -> int:
        weights = self.out_channels * (self.in_channels // self.groups) * self.kernel_size**2
        return weights + (self.out_channels if self.bias else 0)

    @property
    def weight_count(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel_size**2

    def key(self) -> str:
        """A stable identity for shape-keyed tables (latency lookups, caches)."""
        return (
            f"{self.op}-cin{self.in_channels}-cout{self.out_channels}-k{self.kernel_size}"
            f"-s{self.stride}-g{self.groups}-h{self.in_size}"
        )
