"""SpaceEvo's space search over tables: table files, the Q-T score, the aging evolution."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import astuple

import numpy as np
import pytest

from lightning_nas.errors import RecipeError
from lightning_nas.search import spaceevo as S
from lightning_nas.search.spaceevo import QTSettings, SpaceEvoTables, evolve_spaces, qt_score
from lightning_nas.spaces import spaceevo_layout as L
from lightning_nas.spaces.spaceevo_layout import CIFAR_LAYOUT, HeadSpec, MacroLayout, StageSpec, StemSpec

#: Two stages of three widths and two block types: windows [0:2], [0:3], [1:3] per stage, so
#: (2 * 3) ** 2 = 36 spaces in all.
TINY = MacroLayout(name="tiny", resolution=8, num_classes=2, stem=StemSpec(8),
                   stages=(StageSpec(1, (8, 16, 24)), StageSpec(2, (16, 24, 32))), head=HeadSpec(32),
                   block_types=("mbconv", "bottleneck"))


def _rows(values: dict[tuple[int, str, int], tuple[float, float]], layout: MacroLayout = TINY) -> list[dict]:
    """One row per (stage, block type, width) with its (latency, loss); smallest other choices."""
    rows = []
    for (stage, block_type, width), (latency, loss) in values.items():
        spec = L.BLOCK_TYPES[block_type]
        rows.append({"stage": stage, "block_type": block_type, "width": width, "depth": spec.depths[0],
                     "kernel": spec.kernels[0], "expand": spec.expands[0], "latency_ms": latency, "loss": loss})
    return rows


def _uniform_tables(cell_values: dict[tuple[int, str], tuple[float, float]]) -> SpaceEvoTables:
    """Every width of a cell with the same latency and loss: subnet draws become deterministic."""
    values = {(stage, bt, w): v for (stage, bt), v in cell_values.items() for w in TINY.stages[stage].widths}
    return SpaceEvoTables.from_rows(_rows(values), TINY)


def _space(text: str, layout: MacroLayout = TINY) -> L.SpaceChoice:
    return L.parse_space_id(text, layout)


def test_tables_round_trip_csv(tmp_path) -> None:
    tables = _uniform_tables({(0, "mbconv"): (1.25, 0.1), (1, "bottleneck"): (0.5, 1 / 3)})
    path = tables.save_csv(tmp_path / "tables.csv")
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = SpaceEvoTables.load_csv(path, TINY)
    assert list(loaded.rows()) == list(tables.rows())
    assert loaded.cells[1, "bottleneck"].loss[0] == 1 / 3  # full float precision
    assert len(loaded.cells[0, "mbconv"]) == 3 and set(loaded.cells) == {(0, "mbconv"), (1, "bottleneck")}


def test_table_rows_are_validated(tmp_path) -> None:
    good = _rows({(0, "mbconv", 8): (1.0, 0.1)})[0]
    for column, bad, allowed in (("width", 12, "8"), ("block_type", "dual_dw", "bottleneck"),
                                 ("kernel", 7, "5"), ("expand", 8, "6"), ("stage", 2, "1")):
        with pytest.raises(RecipeError) as error:
            SpaceEvoTables.from_rows([good, {**good, column: bad}], TINY, source="t.csv")
        assert error.value.key == f"row 1.{column}" and allowed in error.value.allowed
        assert "t.csv" in str(error.value)
    with pytest.raises(RecipeError, match="finite"):
        SpaceEvoTables.from_rows([{**good, "loss": "nan"}], TINY)
    with pytest.raises(RecipeError, match="lacks columns"):
        (tmp_path / "bad.csv").write_text("stage,width\n0,8\n")
        SpaceEvoTables.load_csv(tmp_path / "bad.csv", TINY)
    tables = SpaceEvoTables.from_rows([good], TINY)
    with pytest.raises(RecipeError, match="no rows in this window") as error:
        tables.window_rows(0, "mbconv", (1, 3))
    assert "[16, 24]" in error.value.allowed
    with pytest.raises(RecipeError, match="no rows for this cell") as error:
        tables.check_complete()
    assert "1/mbconv" in error.value.given and "0/mbconv" not in error.value.given


def _assert_same(first: S.QTScore, second: S.QTScore) -> None:
    """Equal scores and budget terms (NaN equal to NaN: the terms of an infeasible budget)."""
    np.testing.assert_equal([first.score, *map(astuple, first.budgets)],
                            [second.score, *map(astuple, second.budgets)])


def test_qt_score_deterministic_hand_computation() -> None:
    tables = _uniform_tables({(0, "mbconv"): (1.0, 0.2), (1, "bottleneck"): (2.0, 0.3),
                              (0, "bottleneck"): (0.5, 0.4), (1, "mbconv"): (1.5, 0.1)})
    settings = QTSettings(budgets_ms=(3.0, 4.0, 3.5), num_subnets=10, top_k=50, t=0.1, a=0.01, fixed_latency_ms=0.5)
    result = qt_score(tables, "mbconv[0:2]-bottleneck[1:3]", settings)
    # every subnet: latency 0.5 + 1 + 2 = 3.5 ms, loss 0.2 + 0.3 = 0.5
    low, high, edge = result.budgets
    assert (low.p, low.contribution) == (0.0, 0.0) and math.isnan(low.loss) and math.isnan(low.latency_term)
    assert (high.p, high.loss, high.latency_term) == (1.0, pytest.approx(0.5), 1.0)
    assert high.contribution == pytest.approx(2.0)
    assert edge.p == 1.0  # latency <= budget is feasible
    assert result.score == pytest.approx(4.0)
    # the other space: 0.5 + 0.5 + 1.5 = 2.5 ms, loss 0.5 -> every budget feasible, score 3 * 2
    assert qt_score(tables, "bottleneck[0:3]-mbconv[0:2]", settings).score == pytest.approx(6.0)


def test_qt_score_sampled_hand_computation() -> None:
    # stage 0 (mbconv): width 8 -> (1 ms, 0.1), 16 -> (1 ms, 0.3); stage 1 (mbconv): 16 -> (1 ms, 0.2),
    # 24 -> (5 ms, 0.0). Window [0:2] on both: four equally likely subnets.
    values = {(0, "mbconv", 8): (1.0, 0.1), (0, "mbconv", 16): (1.0, 0.3),
              (1, "mbconv", 16): (1.0, 0.2), (1, "mbconv", 24): (5.0, 0.0)}
    tables = SpaceEvoTables.from_rows(_rows(values), TINY)
    settings = QTSettings(budgets_ms=(1.5, 2.5, 10.0), num_subnets=20_000, top_k=50, t=0.9, a=1.0)
    result = qt_score(tables, "mbconv[0:2]-mbconv[0:2]", settings)
    none, half, every = result.budgets
    assert none.p == 0 and none.contribution == 0
    # 2.5 ms: feasible iff stage 1 drew width 16 (p ~ 1/2); the lowest loss there is 0.1 + 0.2
    assert half.p == pytest.approx(0.5, abs=0.02) and half.loss == pytest.approx(0.3)
    assert half.latency_term == pytest.approx(0.9 / half.p)  # (t / p) ** a with a = 1
    assert half.contribution == pytest.approx(half.p / (0.9 * 0.3))
    # 10 ms: everything fits (T = max(1, 0.9) = 1); the lowest loss is 0.1 + 0.0
    assert (every.p, every.loss, every.latency_term) == (1.0, pytest.approx(0.1), 1.0)
    assert result.score == pytest.approx(10 + half.p / 0.27)
    # the same space scores the same whatever else was scored before (seeded by its vector)
    qt_score(tables, "mbconv[1:3]-mbconv[0:2]", settings)
    _assert_same(qt_score(tables, "mbconv[0:2]-mbconv[0:2]", settings), result)
    # fewer feasible subnets than k: L is the mean of all feasible ones
    few = QTSettings(budgets_ms=(2.5,), num_subnets=40, top_k=10_000, t=0.9, a=1.0)
    budget = qt_score(tables, "mbconv[0:2]-mbconv[0:2]", few).budgets[0]
    feasible = round(budget.p * 40)
    assert 0 < feasible < 40 and 0.3 <= budget.loss <= 0.5
    # the mean of n values that are each 0.3 or 0.5 is 0.3 + 0.2 * m / n for an integer m
    m = (budget.loss - 0.3) / 0.2 * feasible
    assert m == pytest.approx(round(m), abs=1e-9)


def test_qt_settings_are_validated() -> None:
    for kwargs, key in (({"budgets_ms": ()}, "budgets_ms"), ({"budgets_ms": (1.0,), "t": 0}, "t"),
                        ({"budgets_ms": (1.0,), "num_subnets": 0}, "num_subnets"),
                        ({"budgets_ms": (-1.0,)}, "budgets_ms"), ({"budgets_ms": (1.0,), "a": -1}, "a")):
        with pytest.raises(RecipeError) as error:
            QTSettings(**kwargs)
        assert error.value.key == key


def _full_tiny_tables(best: dict[int, str] | None = None) -> SpaceEvoTables:
    """Rows for every (stage, block type, width) of TINY; losses depend on the window's widths so
    that most spaces have distinct scores."""
    values = {}
    for stage, spec in enumerate(TINY.stages):
        for bt in TINY.block_types:
            for i, width in enumerate(spec.widths):
                loss = 0.5 - 0.1 * i + (0.0 if best and best[stage] == bt else 0.3)
                values[stage, bt, width] = (1.0 + i, loss)
    return SpaceEvoTables.from_rows(_rows(values), TINY)


def test_evolution_seeds_homogeneous_first_and_spends_the_budget_exactly() -> None:
    tables = _full_tiny_tables()
    settings = QTSettings(budgets_ms=(4.0, 6.0), num_subnets=200, top_k=5)
    result = evolve_spaces(tables, settings, population_size=6, sample_size=3, evaluations=20, seed=1)
    assert len(result.history) == 20 and not result.exhausted
    assert [e.space for e in result.history[:2]] == L.homogeneous_spaces(TINY)
    assert [e.origin for e in result.history[:2]] == ["homogeneous"] * 2
    ids = [e.space.id for e in result.history]
    assert len(set(ids)) == len(ids)
    assert [e.index for e in result.history] == list(range(20))
    assert result.stats["homogeneous"] == 2 and result.stats["random"] == 4
    assert result.stats["block_type"] + result.stats["window"] == 14
    for entry in result.history:
        if entry.origin in ("block_type", "window"):
            parent, child = L.parse_space_id(entry.parent, TINY), entry.space
            diff = [i for i in range(TINY.num_stages) if parent.stages[i] != child.stages[i]]
            assert len(diff) == 1
            same = "window" if entry.origin == "block_type" else "block_type"
            assert getattr(parent.stages[diff[0]], same) == getattr(child.stages[diff[0]], same)
        _assert_same(entry.score, qt_score(tables, entry.space, settings))
    assert result.best(1)[0].score.score == max(e.score.score for e in result.history)
    row = result.history[0].row()
    assert row["space"] == result.history[0].space.id and {"p0", "L0", "T0", "p1", "L1", "T1"} <= set(row)
    # reproducible
    again = evolve_spaces(tables, settings, population_size=6, sample_size=3, evaluations=20, seed=1)
    assert [e.space for e in again.history] == [e.space for e in result.history]
    # a budget smaller than the seeds evaluates only seeds
    tiny_budget = evolve_spaces(tables, settings, population_size=6, sample_size=3, evaluations=1, seed=1)
    assert [e.space for e in tiny_budget.history] == L.homogeneous_spaces(TINY)[:1]


def test_evolution_never_revisits_and_stops_when_every_space_is_seen() -> None:
    # 36 spaces; a budget of 100 cannot be spent without repeats, so the search must stop
    tables = _full_tiny_tables()
    settings = QTSettings(budgets_ms=(5.0,), num_subnets=50, top_k=3)
    result = evolve_spaces(tables, settings, population_size=40, sample_size=4, evaluations=100, seed=0,
                           max_retries=3)
    ids = Counter(e.space.id for e in result.history)
    assert max(ids.values()) == 1
    assert result.exhausted and len(result.history) == 36
    assert result.dropped_duplicates > 0
    # a small population ages members out: still no repeat, and the budget is still exact
    result = evolve_spaces(tables, settings, population_size=3, sample_size=2, evaluations=30, seed=0)
    assert len(result.history) == 30 and len({e.space for e in result.history}) == 30


def test_evolution_finds_the_best_block_type_per_stage() -> None:
    # on the CIFAR layout: each stage has one clearly best block type, none of them homogeneous
    best = {0: "dual_dw", 1: "fused_mbconv", 2: "mbconv_se", 3: "bottleneck", 4: "mbconv"}
    rng = np.random.default_rng(0)
    rows = []
    for stage in range(CIFAR_LAYOUT.num_stages):
        for bt in CIFAR_LAYOUT.block_types:
            for sub in L.substage_choices(stage, bt):
                rows.append({"stage": stage, "block_type": bt, "width": sub.width, "depth": sub.depth,
                             "kernel": sub.kernel, "expand": sub.expand,
                             "latency_ms": sub.width * sub.depth / 100,
                             "loss": (0.05 if bt == best[stage] else 0.2) * rng.uniform(1, 1.2)})
    tables = SpaceEvoTables.from_rows(rows)
    tables.check_complete()
    settings = QTSettings(budgets_ms=(8.0, 12.0), num_subnets=500, top_k=10)
    result = evolve_spaces(tables, settings, population_size=30, sample_size=8, evaluations=300, seed=0)
    top = result.best(1)[0].space
    assert [s.block_type for s in top.stages] == [best[i] for i in range(5)]
    assert result.best(1)[0].score.score > 2 * max(e.score.score for e in result.history[:6])


def test_evolution_arguments_are_checked() -> None:
    tables = _full_tiny_tables()
    settings = QTSettings(budgets_ms=(5.0,), num_subnets=10, top_k=3)
    with pytest.raises(RecipeError) as error:
        evolve_spaces(tables, settings, population_size=4, sample_size=5, evaluations=10)
    assert error.value.key == "sample_size"
    with pytest.raises(RecipeError) as error:
        evolve_spaces(tables, settings, evaluations=0)
    assert error.value.key == "evaluations"


def test_sample_subnets_draws_rows_of_the_window_only() -> None:
    tables = _full_tiny_tables()
    latency, loss = S.sample_subnets(tables, _space("mbconv[1:3]-bottleneck[0:2]"), np.random.default_rng(0),
                                     2000, fixed_latency_ms=0.25)
    # stage 0 widths 16, 24 -> latency 2 or 3; stage 1 widths 16, 24 -> 1 or 2
    assert set(np.round(latency, 6)) == {3.25, 4.25, 5.25}
    assert loss.shape == (2000,)


def test_sample_subnets_is_uniform_and_independent_over_stages() -> None:
    # latencies 1, 2, 4 (stage 0) and 10, 20, 40 (stage 1) decode which rows a subnet drew
    values = {(0, "mbconv", w): (float(2 ** i), 0.1 * i) for i, w in enumerate(TINY.stages[0].widths)}
    values |= {(1, "bottleneck", w): (10.0 * 2 ** i, 0.0) for i, w in enumerate(TINY.stages[1].widths)}
    tables = SpaceEvoTables.from_rows(_rows(values), TINY)
    latency, loss = S.sample_subnets(tables, _space("mbconv[0:3]-bottleneck[0:3]"), np.random.default_rng(3),
                                     (2, 45_000))
    assert latency.shape == loss.shape == (2, 45_000)
    counts = Counter(np.round(latency.ravel(), 6).tolist())
    assert set(counts) == {a + b for a in (1, 2, 4) for b in (10, 20, 40)}
    shares = np.array(list(counts.values())) / latency.size
    assert np.abs(shares - 1 / 9).max() < 0.006  # ~4 standard errors of 90,000 draws
    # a stage's loss comes from the same row as its latency
    first = np.round(latency % 10, 6)
    np.testing.assert_allclose(loss, np.select([first == 1, first == 2, first == 4], [0.0, 0.1, 0.2]))


def test_evolution_reports_every_evaluated_space_in_order() -> None:
    tables = _full_tiny_tables()
    settings = QTSettings(budgets_ms=(4.0, 6.0), num_subnets=100, top_k=5)
    reported: list[S.EvaluatedSpace] = []
    result = evolve_spaces(tables, settings, population_size=6, sample_size=3, evaluations=15, seed=2,
                           progress=reported.append)
    assert reported == result.history and len(reported) == 15
