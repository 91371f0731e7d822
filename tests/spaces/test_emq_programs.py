from __future__ import annotations

import random

import numpy as np
import pytest

from lightning_nas.spaces.emq_programs import (
    BINARY_OPS,
    HAND_MADE,
    INPUTS,
    UNARY_OPS,
    InvalidProgram,
    LayerStatistics,
    Program,
    bitops_table,
    config_indices,
    crossover,
    evaluate_layer,
    hand_made_table,
    mutate,
    program_table,
    random_program,
    score_configs,
    size_table,
)

BITS = (2, 3, 4)


def tiny_stats(seed: int = 0) -> LayerStatistics:
    """Two layers with hand-checkable tensors: a 2x3 and a 3x2 weight."""
    rng = np.random.default_rng(seed)
    tensors = []
    for shape in ((2, 3), (3, 2)):
        w = rng.normal(size=shape)
        perturb = [w * 0.5 ** b for b in BITS]
        tensors.append({"weight": w, "grad": rng.normal(size=shape), "hessian": rng.random(shape),
                        "act": rng.normal(size=(shape[1], 5)), "perturb": perturb,
                        "qweight": [w - p for p in perturb]})
    scalars = {"params": np.array([6.0, 6.0]), "macs": np.array([600.0, 60.0]),
               "hessian_trace": np.array([2.0, 8.0]), "ompq_gamma": np.array([0.5, 1.5]),
               "snip": np.array([1.0, 3.0]), "fisher": np.array([0.1, 0.2]), "synflow": np.array([5.0, 1.0]),
               "grad_norm": np.array([0.3, 0.4])}
    return LayerStatistics(["a", "b"], BITS, tensors, scalars)


def test_there_are_about_twenty_unary_operations_and_four_binary() -> None:
    assert len(UNARY_OPS) >= 20
    assert {"log", "abs", "exp", "normalize", "relu", "invert", "frobenius", "l1", "softmax", "sigmoid", "sqrt",
            "sign", "minmax", "mean", "std"} <= set(UNARY_OPS)
    assert set(BINARY_OPS) == {"add", "subtract", "multiply", "matmul"}


def test_unary_operations_act_within_one_tensor() -> None:
    x = np.array([[1.0, -2.0], [3.0, 0.5]])
    assert UNARY_OPS["softmax"](x).sum() == pytest.approx(1.0)
    assert UNARY_OPS["frobenius"](x)[0, 0] == pytest.approx(np.sqrt(1 + 4 + 9 + 0.25))
    assert UNARY_OPS["l1"](x)[0, 0] == pytest.approx(6.5)
    normalized = UNARY_OPS["normalize"](x)
    assert normalized.mean() == pytest.approx(0.0) and normalized.std() == pytest.approx(1.0)
    assert UNARY_OPS["minmax"](x).min() == 0.0 and UNARY_OPS["minmax"](x).max() == 1.0
    assert np.exp(UNARY_OPS["logsoftmax"](x)).sum() == pytest.approx(1.0)
    assert UNARY_OPS["transpose"](x).shape == (2, 2) and UNARY_OPS["transpose"](x)[0, 1] == 3.0


def test_program_text_key_and_round_trip() -> None:
    p = Program(("weight", "bits"), (("abs", "identity"), ("identity", "identity")), "multiply")
    q = Program(("bits", "weight"), (("identity", "identity"), ("identity", "abs")), "multiply")
    assert str(p) == "sum(multiply(abs(weight), bits))"
    assert p.key() == q.key()  # multiply commutes
    s = Program(("weight", "bits"), (("abs",), ()), "subtract")
    t = Program(("bits", "weight"), ((), ("abs",)), "subtract")
    assert s.key() != t.key()
    assert Program.from_dict(p.to_dict()) == p
    assert str(Program(("weight", "grad"), ((), ()), "add")).startswith("bits * ")
    with pytest.raises(ValueError, match="unknown unary"):
        Program(("weight", "grad"), (("nope",), ()), "add")


def test_mutation_changes_one_gene_and_crossover_mixes_branches() -> None:
    rng = random.Random(0)
    for _ in range(50):
        p = random_program(rng)
        m = mutate(p, rng)
        genes_p = [*p.inputs, *p.unary[0], *p.unary[1], p.binary]
        genes_m = [*m.inputs, *m.unary[0], *m.unary[1], m.binary]
        assert sum(a != b for a, b in zip(genes_p, genes_m)) == 1
        q = random_program(rng)
        c = crossover(p, q, rng)
        assert {(c.inputs[0], c.unary[0]), (c.inputs[1], c.unary[1])} <= {
            (p.inputs[0], p.unary[0]), (q.inputs[0], q.unary[0]), (p.inputs[1], p.unary[1]), (q.inputs[1], q.unary[1])}
        assert c.binary in (p.binary, q.binary)
        assert all(name in INPUTS for name in c.inputs)


def test_program_table_matches_a_hand_computation() -> None:
    stats = tiny_stats()
    # sum(||perturb_b||_1 * b) per layer and bit
    p = Program(("perturb", "bits"), (("l1",), ()), "multiply")
    expected = np.array([[np.abs(layer["perturb"][j]).sum() * b for j, b in enumerate(BITS)]
                         for layer in stats.tensors])
    np.testing.assert_allclose(program_table(p, stats), expected)
    # bit-free: sum(weight * grad) times the bits
    q = Program(("weight", "grad"), ((), ()), "multiply")
    expected = np.array([[(layer["weight"] * layer["grad"]).sum() * b for b in BITS] for layer in stats.tensors])
    np.testing.assert_allclose(program_table(q, stats), expected)
    # matmul where the shapes allow: weight [o, i] @ act [i, positions]
    r = Program(("weight", "act"), ((), ()), "matmul")
    layer = stats.tensors[1]
    np.testing.assert_allclose(evaluate_layer(r, stats, 1), (layer["weight"] @ layer["act"]).sum() * np.array(BITS))


def test_shape_mismatch_is_an_invalid_program() -> None:
    stats = tiny_stats()
    with pytest.raises(InvalidProgram):
        evaluate_layer(Program(("weight", "weight"), ((), ()), "matmul"), stats, 0)  # [2,3] @ [2,3]
    with pytest.raises(InvalidProgram):
        evaluate_layer(Program(("weight", "act"), ((), ()), "add"), stats, 0)  # [2,3] + [3,5]


def test_scores_of_all_configs_at_once_equal_a_loop() -> None:
    stats = tiny_stats()
    table = program_table(Program(("perturb", "hessian"), (("square",), ()), "multiply"), stats)
    configs = [[2, 4], [3, 3], [4, 2], [2, 2]]
    index = config_indices(stats, configs)
    expected = [sum(table[layer, BITS.index(b)] for layer, b in enumerate(c)) for c in configs]
    np.testing.assert_allclose(score_configs(table, index), expected)
    with pytest.raises(ValueError, match="not one of"):
        config_indices(stats, [[2, 5]])


def test_hand_made_proxies_match_their_definitions() -> None:
    stats = tiny_stats()
    perturbation = np.array([[np.square(p).sum() for p in layer["perturb"]] for layer in stats.tensors])
    hawq = np.array([[2.0 / 6.0], [8.0 / 6.0]]) * perturbation
    np.testing.assert_allclose(hand_made_table("hawq_v3", stats), -hawq)  # oriented: higher is better
    np.testing.assert_allclose(hand_made_table("ompq", stats),
                               np.exp(-np.array([[0.5], [1.5]])) * np.array([BITS, BITS]))
    np.testing.assert_allclose(hand_made_table("snip", stats), np.array([[1.0], [3.0]]) * np.array([BITS, BITS]))
    np.testing.assert_allclose(bitops_table(stats), np.array([[600.0], [60.0]]) * np.array([BITS, BITS]) * 8)
    np.testing.assert_allclose(size_table(stats), 6.0 * np.array([BITS, BITS]) / 8)
    assert set(HAND_MADE) >= {"hawq_v3", "ompq", "snip", "fisher", "synflow", "grad_norm", "bitops", "size"}


def test_statistics_round_trip_through_npz(tmp_path) -> None:
    stats = tiny_stats()
    stats.meta["ptq"] = {"layers": ["a", "b"]}
    stats.save(tmp_path / "stats.npz")
    loaded = LayerStatistics.load(tmp_path / "stats.npz")
    assert loaded.names == stats.names and loaded.bit_choices == BITS and loaded.meta == stats.meta
    for a, b in zip(stats.tensors, loaded.tensors):
        np.testing.assert_allclose(a["weight"], b["weight"], rtol=1e-6)
        for pa, pb in zip(a["perturb"], b["perturb"]):
            np.testing.assert_allclose(pa, pb, rtol=1e-6)
    for name, values in stats.scalars.items():
        np.testing.assert_allclose(loaded.scalars[name], values)
    assert not list(tmp_path.glob("*.tmp"))
