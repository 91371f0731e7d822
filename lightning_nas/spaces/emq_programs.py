"""EMQ's proxy search space: small programs over per-layer statistics, and the hand-made proxies.

A *program* is EMQ's tree: two inputs (statistics of one layer), a chain of unary operations on
each branch, one binary operation, and a sum that reduces the result to one number. Every
operation acts within one layer (a softmax or a normalisation runs over that layer's tensor, never
across layers), so a program maps each layer's statistics and bit width to one number; a bit
configuration scores the sum over its layers. That is what makes a proxy drive an integer program.

Evaluation is vectorised over configurations: a program is evaluated once per (layer, candidate
bit width), giving a table ``[layers, bit choices]``; the score of every configuration is then a
gather and a sum (:func:`score_configs`). Branches whose input does not depend on the bit width
are evaluated once per layer. A program none of whose inputs depends on the bit width gives a
per-layer value ``v_l`` and scores ``sum_l v_l * b_l``, the form of EMQ's bit-weighted baselines.

Inputs of a layer (every tensor is a matrix; a scalar is ``1 x 1``):

* ``weight``: the weight, ``[out, in * kh * kw]``; ``grad``: the loss gradient of the weight;
* ``hessian``: Hutchinson's estimate of the Hessian diagonal of the weight (``v * Hv`` averaged);
* ``act``: the layer's input activation on a few images, ``[in channels, positions]``;
* ``perturb``: ``W - Q_b(W)`` and ``qweight``: ``Q_b(W)``, for each candidate bit width ``b``;
* ``bits``: the bit width itself.

Besides the tensors, :class:`LayerStatistics` carries per-layer scalars (parameter count, MACs,
Hessian trace, OMPQ's orthogonality, node-wise zero-cost values) from which the hand-made proxies
(:data:`HAND_MADE`) are tables too, so one integer program serves every proxy.

This module must not import torch: the evolution and the integer program use it.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INPUTS: tuple[str, ...] = ("weight", "grad", "hessian", "act", "perturb", "qweight", "bits")
#: Inputs with one value per candidate bit width.
BIT_INPUTS = frozenset({"perturb", "qweight", "bits"})
_EPS = 1e-12


class InvalidProgram(ValueError):
    """A program whose operations do not fit the shapes they receive."""


def _scalar(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(1, 1)


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


#: Unary operations: each maps one layer's matrix to a matrix (reductions give ``1 x 1``).
UNARY_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "abs": np.abs,
    "square": np.square,
    "sqrt": lambda x: np.sqrt(np.abs(x)),
    "exp": np.exp,
    "log": lambda x: np.log(np.maximum(x, 0.0) + _EPS),
    "abslog": lambda x: np.log(np.abs(x) + _EPS),
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),  # overflow-free logistic
    "sign": np.sign,
    "invert": lambda x: 1.0 / x,
    "normalize": _normalize,
    "minmax": _minmax,
    "softmax": _softmax,
    "logsoftmax": _log_softmax,
    "normsum": lambda x: x / np.abs(x).sum(),
    "frobenius": lambda x: _scalar(np.sqrt(np.square(x).sum())),
    "l1": lambda x: _scalar(np.abs(x).sum()),
    "mean": lambda x: _scalar(x.mean()),
    "std": lambda x: _scalar(x.std()),
    "transpose": _transpose,
}


def _broadcast(a: np.ndarray, b: np.ndarray) -> None:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise InvalidProgram(f"shapes {a.shape} and {b.shape} do not broadcast") from None


def _elementwise(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def op(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _broadcast(a, b)
        return fn(a, b)

    return op


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[1] != b.shape[0]:
        raise InvalidProgram(f"matmul of {a.shape} and {b.shape}")
    return a @ b


BINARY_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": _elementwise(np.add),
    "subtract": _elementwise(np.subtract),
    "multiply": _elementwise(np.multiply),
    "matmul": _matmul,
}
COMMUTATIVE = frozenset({"add", "multiply"})


@dataclass(frozen=True)
class Program:
    """EMQ's tree: ``binary(chain_0(inputs[0]), chain_1(inputs[1]))``, summed over the result."""

    inputs: tuple[str, str]
    unary: tuple[tuple[str, ...], tuple[str, ...]]
    binary: str

    def __post_init__(self) -> None:
        for name in self.inputs:
            if name not in INPUTS:
                raise ValueError(f"unknown program input {name!r}; available: {', '.join(INPUTS)}")
        for chain in self.unary:
            for op in chain:
                if op not in UNARY_OPS:
                    raise ValueError(f"unknown unary operation {op!r}; available: {', '.join(UNARY_OPS)}")
        if self.binary not in BINARY_OPS:
            raise ValueError(f"unknown binary operation {self.binary!r}; available: {', '.join(BINARY_OPS)}")

    @property
    def depends_on_bits(self) -> bool:
        return any(name in BIT_INPUTS for name in self.inputs)

    def branch_text(self, index: int) -> str:
        text = self.inputs[index]
        for op in self.unary[index]:
            if op != "identity":
                text = f"{op}({text})"
        return text

    def __str__(self) -> str:
        text = f"sum({self.binary}({self.branch_text(0)}, {self.branch_text(1)}))"
        return text if self.depends_on_bits else f"bits * {text}"

    def key(self) -> str:
        """Structural identity: identity operations dropped, operands of add/multiply sorted."""
        a, b = self.branch_text(0), self.branch_text(1)
        if self.binary in COMMUTATIVE and b < a:
            a, b = b, a
        return f"{self.binary}({a},{b})"

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": list(self.inputs), "unary": [list(c) for c in self.unary], "binary": self.binary,
                "text": str(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Program:
        inputs = tuple(data["inputs"])
        unary = tuple(tuple(c) for c in data["unary"])
        if len(inputs) != 2 or len(unary) != 2:
            raise ValueError("a program has two inputs and two unary chains")
        return cls(inputs, unary, data["binary"])  # type: ignore[arg-type]


def random_program(rng: random.Random, chain_length: int = 2) -> Program:
    return Program(
        (rng.choice(INPUTS), rng.choice(INPUTS)),
        tuple(tuple(rng.choice(list(UNARY_OPS)) for _ in range(chain_length)) for _ in range(2)),  # type: ignore[arg-type]
        rng.choice(list(BINARY_OPS)),
    )


def mutate(program: Program, rng: random.Random) -> Program:
    """Change one gene: an input, one unary operation, or the binary operation."""
    slots = 2 + sum(len(c) for c in program.unary) + 1
    slot = rng.randrange(slots)
    inputs, unary, binary = list(program.inputs), [list(c) for c in program.unary], program.binary
    if slot < 2:
        inputs[slot] = rng.choice([n for n in INPUTS if n != inputs[slot]])
    elif slot == slots - 1:
        binary = rng.choice([b for b in BINARY_OPS if b != binary])
    else:
        position = slot - 2
        branch = 0 if position < len(unary[0]) else 1
        position -= 0 if branch == 0 else len(unary[0])
        unary[branch][position] = rng.choice([u for u in UNARY_OPS if u != unary[branch][position]])
    return Program((inputs[0], inputs[1]), (tuple(unary[0]), tuple(unary[1])), binary)


def crossover(first: Program, second: Program, rng: random.Random) -> Program:
    """Branch 0 from one parent, branch 1 from the other, the binary operation from either."""
    a, b = (first, second) if rng.random() < 0.5 else (second, first)
    return Program((a.inputs[0], b.inputs[1]), (a.unary[0], b.unary[1]), rng.choice([first.binary, second.binary]))


# --- statistics ------------------------------------------------------------------------------

#: Per-layer scalars every statistics file carries (besides the tensors of :data:`INPUTS`).
SCALARS: tuple[str, ...] = ("params", "macs", "hessian_trace", "ompq_gamma")


@dataclass
class LayerStatistics:
    """Statistics of one network's searchable layers, computed once on one batch.

    ``tensors[l][name]`` is a matrix for bit-free inputs and a list with one matrix per entry of
    ``bit_choices`` for ``perturb`` / ``qweight``; ``scalars[name]`` has one value per layer.
    """

    names: list[str]
    bit_choices: tuple[int, ...]
    tensors: list[dict[str, Any]]
    scalars: dict[str, np.ndarray]
    activation_bits: int = 8
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def save(self, path: str | Path) -> None:
        """One ``.npz`` (tensors keyed ``l<i>/<input>[/<bits>]``), written under a temporary name."""
        arrays: dict[str, np.ndarray] = {}
        for index, tensors in enumerate(self.tensors):
            for name, value in tensors.items():
                if isinstance(value, list):
                    for bits, matrix in zip(self.bit_choices, value):
                        arrays[f"l{index}/{name}/{bits}"] = np.asarray(matrix, dtype=np.float32)
                else:
                    arrays[f"l{index}/{name}"] = np.asarray(value, dtype=np.float32)
        for name, values in self.scalars.items():
            arrays[f"scalar/{name}"] = np.asarray(values, dtype=np.float64)
        header = {"names": self.names, "bit_choices": list(self.bit_choices), "activation_bits": self.activation_bits,
                  "meta": self.meta}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(handle)
        try:
            with open(temporary, "wb") as stream:
                np.savez(stream, **arrays)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    @classmethod
    def load(cls, path: str | Path) -> LayerStatistics:
        with np.load(path) as data:
            header = json.loads(bytes(data["header"]).decode())
            bit_choices = tuple(header["bit_choices"])
            tensors: list[dict[str, Any]] = [{} for _ in header["names"]]
            scalars: dict[str, np.ndarray] = {}
            for key in data.files:
                parts = key.split("/")
                if parts[0] == "scalar":
                    scalars[parts[1]] = data[key].astype(np.float64)
                elif parts[0].startswith("l"):
                    layer = tensors[int(parts[0][1:])]
                    matrix = data[key].astype(np.float64)
                    if len(parts) == 3:
                        layer.setdefault(parts[1], [None] * len(bit_choices))[bit_choices.index(int(parts[2]))] = matrix
                    else:
                        layer[parts[1]] = matrix
        return cls(header["names"], bit_choices, tensors, scalars, header["activation_bits"], header["meta"])


def bit_matrix(stats: LayerStatistics) -> np.ndarray:
    """``[layers, bit choices]`` of the bit widths themselves."""
    return np.tile(np.asarray(stats.bit_choices, dtype=np.float64), (stats.num_layers, 1))


def _input(stats: LayerStatistics, layer: int, name: str, bit_index: int | None) -> np.ndarray:
    if name == "bits":
        return _scalar(stats.bit_choices[bit_index if bit_index is not None else 0])
    value = stats.tensors[layer][name]
    return value[bit_index] if isinstance(value, list) else value


def _branch(stats: LayerStatistics, layer: int, name: str, chain: Sequence[str], bit_index: int | None) -> np.ndarray:
    x = _input(stats, layer, name, bit_index)
    for op in chain:
        x = UNARY_OPS[op](x)
        if x.ndim != 2:
            raise InvalidProgram(f"{op} gave a {x.ndim}-d array")
    return x


def evaluate_layer(program: Program, stats: LayerStatistics, layer: int) -> np.ndarray:
    """The program's value for ``layer`` at every candidate bit width (``[bit choices]``).

    Raises :class:`InvalidProgram` when the shapes do not fit; the values may be NaN or infinite
    (screening rejects those).
    """
    choices = range(len(stats.bit_choices))
    with np.errstate(all="ignore"):
        branches = []
        for name, chain in zip(program.inputs, program.unary):
            if name in BIT_INPUTS:
                branches.append([_branch(stats, layer, name, chain, j) for j in choices])
            else:
                value = _branch(stats, layer, name, chain, None)
                branches.append([value] * len(stats.bit_choices))
        binary = BINARY_OPS[program.binary]
        if program.depends_on_bits:
            return np.array([float(binary(a, b).sum()) for a, b in zip(*branches)])
        value = float(binary(branches[0][0], branches[1][0]).sum())
        return value * np.asarray(stats.bit_choices, dtype=np.float64)


def program_table(program: Program, stats: LayerStatistics, layers: Sequence[int] | None = None) -> np.ndarray:
    """``[layers, bit choices]``: the program's value per layer and bit width."""
    indices = range(stats.num_layers) if layers is None else layers
    return np.stack([evaluate_layer(program, stats, layer) for layer in indices])


def score_configs(table: np.ndarray, bit_index: np.ndarray) -> np.ndarray:
    """Scores of configurations ``bit_index`` (``[configs, layers]`` of indices into the bit choices)."""
    layers = np.arange(table.shape[0])
    return table[layers, bit_index].sum(axis=1)


def config_indices(stats: LayerStatistics, configs: Sequence[Sequence[int]]) -> np.ndarray:
    """Bit widths per layer -> indices into ``stats.bit_choices``."""
    lookup = {b: i for i, b in enumerate(stats.bit_choices)}
    try:
        return np.asarray([[lookup[int(b)] for b in config] for config in configs], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"bit width {error.args[0]} is not one of {stats.bit_choices}") from None


# --- hand-made proxies -----------------------------------------------------------------------


def _perturbation(stats: LayerStatistics) -> np.ndarray:
    return np.array([[float(np.square(p).sum()) for p in layer["perturb"]] for layer in stats.tensors])


def hawq_table(stats: LayerStatistics) -> np.ndarray:
    """HAWQ-V2/V3 sensitivity ``Tr(H_l) / n_l * ||W_l - Q_b(W_l)||^2`` (lower is better)."""
    trace = stats.scalars["hessian_trace"] / stats.scalars["params"]
    return trace[:, None] * _perturbation(stats)


def ompq_theta(stats: LayerStatistics, beta: float = 1.0) -> np.ndarray:
    """OMPQ's layer importance ``theta_l = exp(-beta * gamma_l)``, ``gamma_l`` the summed
    orthogonality of layer ``l``'s features with every other layer's."""
    return np.exp(-beta * stats.scalars["ompq_gamma"])


def _bit_weighted(values: np.ndarray, stats: LayerStatistics) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[:, None] * bit_matrix(stats)


#: Name -> (table function, sign): ``sign * table`` is higher for configurations predicted better.
HAND_MADE: dict[str, tuple[Callable[[LayerStatistics], np.ndarray], float]] = {
    "hawq_v3": (hawq_table, -1.0),
    "ompq": (lambda s: _bit_weighted(ompq_theta(s), s), 1.0),
    "snip": (lambda s: _bit_weighted(s.scalars["snip"], s), 1.0),
    "fisher": (lambda s: _bit_weighted(s.scalars["fisher"], s), 1.0),
    "synflow": (lambda s: _bit_weighted(s.scalars["synflow"], s), 1.0),
    "grad_norm": (lambda s: _bit_weighted(s.scalars["grad_norm"], s), 1.0),
    "bitops": (lambda s: _bit_weighted(s.scalars["macs"] * s.activation_bits, s), 1.0),
    "size": (lambda s: _bit_weighted(s.scalars["params"] / 8.0, s), 1.0),
}


def hand_made_table(name: str, stats: LayerStatistics) -> np.ndarray:
    """``sign * table`` of a hand-made proxy: higher predicts a more accurate configuration."""
    if name not in HAND_MADE:
        raise ValueError(f"unknown hand-made proxy {name!r}; available: {', '.join(HAND_MADE)}")
    table_fn, sign = HAND_MADE[name]
    return sign * table_fn(stats)


def size_table(stats: LayerStatistics) -> np.ndarray:
    """Bytes of each layer's weights at each bit width."""
    return stats.scalars["params"][:, None] * bit_matrix(stats) / 8.0


def bitops_table(stats: LayerStatistics) -> np.ndarray:
    return stats.scalars["macs"][:, None] * bit_matrix(stats) * stats.activation_bits
