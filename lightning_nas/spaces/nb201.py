"""NAS-Bench-201 cell search space: operations, architecture strings, enumeration, encodings.

This module is deliberately torch-free at import time: recipe validation and search strategies
parse, enumerate and encode architectures without paying for (or requiring) torch. Only
:meth:`NB201Space.build` imports the network code, lazily.

A cell is a DAG on 4 nodes; node ``j`` sums one operation applied to every earlier node ``i < j``.
The 6 edges are ordered as in the official architecture string::

    |op~0|+|op~0|op~1|+|op~0|op~1|op~2|
     (1<-0)  (2<-0)(2<-1)  (3<-0)(3<-1)(3<-2)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NUM_NODES = 4
# (to_node, from_node) for each edge, in architecture-string order.
EDGES: tuple[tuple[int, int], ...] = tuple((j, i) for j in range(1, NUM_NODES) for i in range(j))
NUM_EDGES = len(EDGES)
NUM_ARCHS = len(OPS) ** NUM_EDGES  # 15,625

# Operations that carry a weight layer (one conv each); the others are parameter-free.
WEIGHTED_OPS: frozenset[str] = frozenset({"nor_conv_1x1", "nor_conv_3x3"})

Genotype = tuple[str, ...]  # one op name per edge, in EDGES order


def parse_arch(arch_str: str) -> Genotype:
    """Parse ``|op~i|+|op~i|op~i|+...`` into a tuple of 6 op names (EDGES order).

    Raises ValueError naming the offending token and what is allowed.
    """
    if not isinstance(arch_str, str):
        raise ValueError(f"architecture must be a string, got {type(arch_str).__name__}")
    node_strs = arch_str.strip().split("+")
    if len(node_strs) != NUM_NODES - 1:
        raise ValueError(
            f"architecture {arch_str!r} has {len(node_strs)} node groups separated by '+'; "
            f"expected {NUM_NODES - 1} (e.g. '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...~0|...~1|...~2|')"
        )
    ops: list[str] = []
    for node, node_str in enumerate(node_strs, start=1):
        if not (node_str.startswith("|") and node_str.endswith("|")) or len(node_str) < 2:
            raise ValueError(f"node group {node_str!r} of {arch_str!r} must be enclosed in '|' ... '|'")
        tokens = node_str[1:-1].split("|")
        if len(tokens) != node:
            raise ValueError(
                f"node {node} group {node_str!r} has {len(tokens)} edges; expected {node} "
                f"(inputs ~0..~{node - 1})"
            )
        for expected_input, token in enumerate(tokens):
            op, sep, inp = token.partition("~")
            if not sep:
                raise ValueError(f"token {token!r} in {arch_str!r} must look like 'op~input'")
            if op not in OPS:
                raise ValueError(f"unknown operation {op!r} in token {token!r}; allowed: {', '.join(OPS)}")
            if inp != str(expected_input):
                raise ValueError(
                    f"token {token!r} of node {node} has input {inp!r}; expected ~{expected_input} "
                    f"(inputs must be listed in order ~0..~{node - 1})"
                )
            ops.append(op)
    return tuple(ops)


def format_arch(ops: Sequence[str]) -> str:
    """Inverse of :func:`parse_arch`."""
    ops = tuple(ops)
    if len(ops) != NUM_EDGES:
        raise ValueError(f"expected {NUM_EDGES} operations, got {len(ops)}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; allowed: {', '.join(OPS)}")
    groups: list[str] = []
    k = 0
    for node in range(1, NUM_NODES):
        groups.append("|" + "|".join(f"{ops[k + i]}~{i}" for i in range(node)) + "|")
        k += node
    return "+".join(groups)


def iter_archs() -> Iterator[str]:
    """All 15,625 cells in a fixed order (op index odometer over EDGES, last edge fastest)."""
    for ops in itertools.product(OPS, repeat=NUM_EDGES):
        yield format_arch(ops)


def all_archs() -> list[str]:
    return list(iter_archs())


def arch_index(arch_str: str) -> int:
    """Position of ``arch_str`` in :func:`iter_archs` (not the NAS-Bench-201 benchmark index)."""
    idx = 0
    for op in parse_arch(arch_str):
        idx = idx * len(OPS) + OPS.index(op)
    return idx


def encode_onehot(arch_str: str) -> list[float]:
    """Flat one-hot encoding: 6 edges x 5 ops = 30 inputs, edge-major."""
    vec = [0.0] * (NUM_EDGES * len(OPS))
    for e, op in enumerate(parse_arch(arch_str)):
        vec[e * len(OPS) + OPS.index(op)] = 1.0
    return vec


def decode_onehot(vector: Sequence[float]) -> str:
    """Inverse of :func:`encode_onehot`."""
    n = len(OPS)
    if len(vector) != NUM_EDGES * n:
        raise ValueError(f"encoding must have {NUM_EDGES * n} entries, got {len(vector)}")
    ops = []
    for e in range(NUM_EDGES):
        hot = [i for i, v in enumerate(vector[e * n : (e + 1) * n]) if v > 0.5]
        if len(hot) != 1:
            raise ValueError(f"encoding of edge {e} is not one-hot: {list(vector[e * n : (e + 1) * n])}")
        ops.append(OPS[hot[0]])
    return format_arch(ops)


def weight_slot_names(cells_per_stage: int = 5) -> list[str]:
    """Module names of every weight layer position of the macro skeleton, in module order.

    These names are exactly the ``named_modules`` names of the conv / linear layers of a network
    built by :mod:`lightning_nas.nn.nb201` when every edge is a convolution. Node-wise statistics
    of any architecture are aligned to these slots (a parameter-free edge leaves its slot empty),
    which gives every architecture the same fixed-length feature.
    """
    names = ["stem.0"]
    position = 0
    for stage in range(3):
        if stage > 0:
            names += [f"cells.{position}.conv_a.op.1", f"cells.{position}.conv_b.op.1",
                      f"cells.{position}.downsample.1"]
            position += 1
        for _ in range(cells_per_stage):
            names += [f"cells.{position}.edges.{e}.op.1" for e in range(NUM_EDGES)]
            position += 1
    names.append("classifier")
    return names


class NB201Space:
    """The NAS-Bench-201 space with its macro skeleton hyper-parameters.

    A config is an architecture string; every well-formed string is canonical (the space has no
    settings that leave the network unchanged).
    """

    #: Registry name of the space.
    name: str = "nb201"

    def __init__(self, num_classes: int = 10, init_channels: int = 16, cells_per_stage: int = 5) -> None:
        if num_classes < 1 or init_channels < 1 or cells_per_stage < 1:
            raise ValueError("num_classes, init_channels and cells_per_stage must be positive")
        self.num_classes = num_classes
        self.init_channels = init_channels
        self.cells_per_stage = cells_per_stage

    ops = OPS
    num_archs = NUM_ARCHS

    def __len__(self) -> int:
        return NUM_ARCHS

    def __iter__(self) -> Iterator[str]:
        return iter_archs()

    def parse(self, arch_str: str) -> Genotype:
        return parse_arch(arch_str)

    def format(self, ops: Sequence[str]) -> str:
        return format_arch(ops)

    def validate(self, arch_str: str) -> str:
        """Return the canonical string (raises ValueError if malformed)."""
        return format_arch(parse_arch(arch_str))

    def canonical(self, arch_str: str) -> str:
        return self.validate(arch_str)

    def config_key(self, arch_str: str) -> str:
        return self.validate(arch_str)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this space."""
        return {"num_classes": self.num_classes, "init_channels": self.init_channels,
                "cells_per_stage": self.cells_per_stage}

    @property
    def encoding_size(self) -> int:
        return NUM_EDGES * len(OPS)

    def encode(self, arch_str: str) -> list[float]:
        return encode_onehot(arch_str)

    def decode(self, vector: Sequence[float]) -> str:
        return decode_onehot(vector)

    def mutate(self, arch_str: str, rng: random.Random) -> str:
        """One random edge set to a different op (the mutation of regularized evolution on
        NAS-Bench-201, Real et al. 2019 / Dong and Yang 2020): a child always differs."""
        ops = list(parse_arch(arch_str))
        edge = rng.randrange(NUM_EDGES)
        ops[edge] = rng.choice([op for op in OPS if op != ops[edge]])
        return format_arch(ops)

    def crossover(self, first: str, second: str, rng: random.Random) -> str:
        """Uniform crossover: every edge's op comes from either parent with equal probability."""
        a, b = parse_arch(first), parse_arch(second)
        return format_arch([x if rng.random() < 0.5 else y for x, y in zip(a, b)])

    def sample(self, rng: Any) -> str:
        """Uniform sample using any object with ``choice`` (random.Random, numpy Generator)."""
        return format_arch([str(rng.choice(OPS)) for _ in range(NUM_EDGES)])

    def weight_slots(self) -> list[str]:
        return weight_slot_names(self.cells_per_stage)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.hparams() == self.hparams()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return (f"NB201Space(num_classes={self.num_classes}, init_channels={self.init_channels}, "
                f"cells_per_stage={self.cells_per_stage})")
