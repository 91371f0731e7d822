"""What every search space offers, as structural protocols (torch-free).

A *config* is whatever one point of a space is: a dict ``{ks, e, d, r}`` for the once-for-all
space, a list of op names for ProxylessNAS, an architecture string for NAS-Bench-201, a bit-width
dict for a quantization policy, a :class:`~lightning_nas.search.joint_space.Candidate` for the
joint space. Consumers (cost models, predictors, search, pair collectors) are typed against these
protocols instead of probing spaces with ``hasattr``:

* :class:`SearchSpace`: what search and predictors need of any space: sampling, the evolution
  operators, validation and the canonical form, the predictor encoding, and the arguments that
  rebuild the space (``{"name": space.name, **space.hparams()}`` is a registry spec).
* :class:`BoundedSpace`: a space with a smallest and a largest point (the elastic spaces).
* :class:`CostModelSpace`: a space whose configs describe their layers
  (:class:`~lightning_nas.spaces.layers.LayerSpec`), so counts, latency tables and accelerator
  models can price them without building a network.
* :class:`ElasticSpace`: a once-for-all style space (per-block kernel and expand ratio, per-stage
  depth, a resolution) that cost tables decompose block by block.

Building a network is not part of any protocol: it lives in :mod:`lightning_nas.nn.builders`
(``build_supernet`` / ``build_subnet``, dispatched on the space's type), so this core imports
neither torch nor the network code.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from lightning_nas.spaces.layers import LayerSpec
from lightning_nas.spaces.ofa_layout import BlockSpec

__all__ = ["BoundedSpace", "CostModelSpace", "ElasticSpace", "SearchSpace"]

ConfigT = TypeVar("ConfigT")


@runtime_checkable
class SearchSpace(Protocol[ConfigT]):
    """A space search strategies and predictors can work on.

    Every method that takes a config validates it (``ValueError`` naming the bad entry) unless it
    says otherwise; every config a method returns is canonical.
    """

    #: Registry name of the space (its preset name for a preset, e.g. ``ofa_mbv3_cifar``).
    name: str

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments that rebuild the space (with :attr:`name`, a registry spec)."""
        ...

    def sample(self, rng: random.Random) -> ConfigT:
        """A random canonical config drawn from ``rng`` alone (same seed, same config)."""
        ...

    def mutate(self, config: ConfigT, rng: random.Random) -> ConfigT:
        """A canonical child of ``config`` (evolution's mutation; spaces may take rate arguments)."""
        ...

    def crossover(self, first: ConfigT, second: ConfigT, rng: random.Random) -> ConfigT:
        """A canonical child mixing the genes of two parents."""
        ...

    def validate(self, config: Any) -> ConfigT:
        """A normalised copy of ``config`` (plain lists and ints), or ``ValueError``."""
        ...

    def canonical(self, config: Any) -> ConfigT:
        """The validated config with entries that do not change the network normalised, so that
        equal networks have equal configs."""
        ...

    def config_key(self, config: Any) -> Hashable:
        """A hashable identity, equal iff the canonical configs are equal."""
        ...

    @property
    def encoding_size(self) -> int:
        """Length of :meth:`encode`'s vector."""
        ...

    def encode(self, config: Any) -> list[float]:
        """The predictor's feature vector of ``config`` (one-to-one on canonical configs)."""
        ...

    def decode(self, vector: Sequence[float]) -> ConfigT:
        """Inverse of :meth:`encode`: the canonical config of a vector ``encode`` produced."""
        ...


@runtime_checkable
class BoundedSpace(SearchSpace[ConfigT], Protocol[ConfigT]):
    """A space with well-defined extreme points (reference subnets, constraint fallbacks)."""

    def smallest(self) -> ConfigT:
        ...

    def largest(self) -> ConfigT:
        ...


@runtime_checkable
class CostModelSpace(SearchSpace[ConfigT], Protocol[ConfigT]):
    """A space whose configs list their layers, for cost models that never build a network."""

    def layer_specs(self, config: Any, resolution: int | None = None) -> list[LayerSpec]:
        """Every convolution / linear layer of the network of ``config``, in execution order."""
        ...

    def macs(self, config: Any, resolution: int | None = None) -> int:
        """Multiply-accumulates of one image (the sum over :meth:`layer_specs`)."""
        ...

    def params(self, config: Any) -> int:
        """Trainable parameters of the network, batch norm included where it has any."""
        ...


@runtime_checkable
class ElasticSpace(CostModelSpace[dict], BoundedSpace[dict], Protocol):
    """A once-for-all style space: ``{"ks": [B], "e": [B], "d": [S], "r": int}`` configs over ``S``
    stages of at most ``max_depth`` blocks (``B = S * max_depth``).

    Cost tables (:class:`~lightning_nas.hardware.counts.BlockDecomposition`) and the joint
    architecture x policy space read these attributes to tabulate costs block by block.
    """

    resolutions: list[int]
    kernel_choices: list[int]
    expand_choices: list[int]
    depth_choices: list[int]
    num_blocks: int
    num_stages: int
    max_depth: int
    #: Static facts of every block (channels, stride, activation, squeeze-excite), by index.
    blocks: Sequence[BlockSpec]

    def stage_blocks(self, stage: int) -> range:
        """Indices of the blocks of ``stage``."""
        ...

    def active_blocks(self, config: Mapping[str, Any]) -> list[int]:
        """Indices of the blocks that run in ``config``."""
        ...
