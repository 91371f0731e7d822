"""``lightning-nas search`` with a ``spaceevo:`` section (lightning_nas/stages/spaceevo_search.py).

The tables are the smoke fixture under tests/fixtures/spaceevo (synthetic, made by
:func:`write_fixture_tables`; ``PYTHONPATH=$PWD python tests/stages/test_spaceevo_search.py`` rewrites
them).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_nas.cli import main
from lightning_nas.errors import RecipeError
from lightning_nas.files import write_json
from lightning_nas.hardware.spaceevo_latency import LATENCY_COLUMNS, cell_input
from lightning_nas.recipe.loader import load_recipe
from lightning_nas.search.spaceevo import QTSettings, qt_score
from lightning_nas.spaces import spaceevo_layout as L
from lightning_nas.stages import spaceevo_search as stage

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "spaceevo"
LATENCY = FIXTURE / "spaceevo_latency.csv"
LOSSES = FIXTURE / "losses.csv"
#: The target the fixture's latency meta records.
FIXTURE_TARGET = "x86_avx2/torch"


def write_fixture_tables(directory: Path) -> None:
    """Synthetic tables of the CIFAR layout for smoke runs and tests: per cell and width, the
    smallest and the largest sub-stage in the latency table (latency from the MACs at the profile's
    input width, a per-block-type int8 speed factor) and those two plus one more in the loss table
    (a loss falling with capacity, a per-block-type quality). Not measured: no figure comes from them."""
    layout = L.CIFAR_LAYOUT
    speed = {"dual_dw": 1.3, "mbconv": 1.0, "mbconv_se": 1.4, "bottleneck": 0.8, "fused_mbconv": 0.7,
             "fused_mbconv_se": 0.9}
    quality = {"dual_dw": 1.2, "mbconv": 1.0, "mbconv_se": 0.85, "bottleneck": 1.1, "fused_mbconv": 0.95,
               "fused_mbconv_se": 0.9}
    latency_rows, loss_rows = [], []
    for index in range(layout.num_stages):
        in_channels, in_size = cell_input(layout, index)
        for block_type in layout.block_types:
            spec = L.BLOCK_TYPES[block_type]
            for width in layout.stages[index].widths:
                small = L.SubStage(width, min(spec.depths), min(spec.kernels), min(spec.expands))
                large = L.SubStage(width, max(spec.depths), max(spec.kernels), max(spec.expands))
                middle = L.SubStage(width, max(spec.depths), min(spec.kernels), min(spec.expands))
                for sub in dict.fromkeys((small, large, middle)):
                    macs = sum(s.macs for s in L.substage_layers(index, block_type, sub, in_channels, layout))
                    key = {"stage": index, "block_type": block_type, "width": sub.width, "depth": sub.depth,
                           "kernel": sub.kernel, "expand": float(sub.expand)}
                    capacity = sub.width * sub.depth * math.sqrt(sub.expand) * (1 + 0.1 * sub.kernel)
                    loss_rows.append({**key, "loss": f"{quality[block_type] * 20 / capacity:.6g}"})
                    if sub is not middle:
                        latency = round(0.02 * sub.depth + speed[block_type] * macs / 50e6, 6)
                        latency_rows.append({**key, "in_channels": in_channels, "in_size": in_size,
                                             "latency_ms": latency, "mean_ms": latency, "std_ms": 0.0})
    directory.mkdir(parents=True, exist_ok=True)
    for path, columns, rows in ((directory / "spaceevo_latency.csv", LATENCY_COLUMNS, latency_rows),
                                (directory / "losses.csv", ("stage", "block_type", "width", "depth", "kernel",
                                                            "expand", "loss"), loss_rows)):
        with path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    write_json(directory / "spaceevo_latency.csv.meta.json", {
        "synthetic": "smoke fixture of recipes/spaceevo_cifar10.yaml, written by "
                     "tests/stages/test_spaceevo_search.py: latency from MACs, not measured",
        "target": FIXTURE_TARGET, "layout": json.loads(json.dumps(dataclasses.asdict(layout))), "unit": "ms"})


def _recipe(tmp_path: Path, name: str = "se", **spaceevo: object) -> Path:
    section = {"latency": str(LATENCY), "losses": str(LOSSES), "budgets_ms": [0.6, 1.2], "num_subnets": 400,
               "best_subnets": 10, "population": 10, "sample_size": 4, "evaluations": 24,
               "target": FIXTURE_TARGET, "progress": False, **spaceevo}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"description": "test", "run_dir": str(tmp_path / "runs" / name), "seed": 3,
                                    "spaceevo": section}))
    return path


def _run(path: Path) -> Path:
    return stage.run(load_recipe(path, []))


def test_committed_fixture_is_the_generator_output(tmp_path: Path) -> None:
    write_fixture_tables(tmp_path)
    for name in ("spaceevo_latency.csv", "spaceevo_latency.csv.meta.json", "losses.csv"):
        assert (tmp_path / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_join_keeps_the_sub_stages_of_both_tables() -> None:
    joined = stage.join_tables(LATENCY, LOSSES, L.CIFAR_LAYOUT)
    assert (joined.latency_rows, joined.loss_rows, joined.joined_rows) == (360, 540, 360)
    assert len(joined.rows_per_cell) == 30 and set(joined.rows_per_cell.values()) == {12}
    with LOSSES.open() as stream:
        losses = {(r["stage"], r["block_type"], r["width"], r["depth"], r["kernel"], float(r["expand"])): float(r["loss"])
                  for r in csv.DictReader(stream)}
    row = next(r for r in joined.tables.rows() if r["stage"] == 2 and r["block_type"] == "bottleneck")
    key = ("2", "bottleneck", str(row["width"]), str(row["depth"]), str(row["kernel"]), row["expand"])
    assert row["loss"] == losses[key]


def test_search_writes_spaces_best_spaces_and_plot(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    assert main(["search", str(path)]) == 0
    run_dir = tmp_path / "runs" / "se"
    rows = stage.read_spaces_csv(run_dir / stage.SPACES_CSV)
    assert [r["index"] for r in rows] == list(range(24))
    assert len({r["space"] for r in rows}) == 24
    assert [r["space"] for r in rows[:6]] == [s.id for s in L.homogeneous_spaces()]
    assert {r["origin"] for r in rows[10:]} <= {"block_type", "window"}
    for r in rows:
        assert r["score"] == pytest.approx(r["qt0"] + r["qt1"], rel=1e-12)
        choice = L.parse_space_id(r["space"])
        assert r["stage4_block_type"] == choice.stages[4].block_type
        assert r["stage4_window"] == "{}:{}".format(*choice.stages[4].window)
    record = json.loads((run_dir / stage.BEST_JSON).read_text())
    assert record["budgets_ms"] == [0.6, 1.2] and record["target"] == FIXTURE_TARGET and record["seed"] == 3
    assert record["tables"]["latency"]["meta"]["target"] == FIXTURE_TARGET
    assert record["tables"]["latency"]["path"] == str(LATENCY) and record["tables"]["joined_rows"] == 360
    best = record["best"]
    assert len(best) == 10 and best[0]["score"] == max(r["score"] for r in rows)
    assert [b["score"] for b in best] == sorted((b["score"] for b in best), reverse=True)
    # the score of the best space is SpaceEvoTables' own Q-T score of it
    tables = stage.join_tables(LATENCY, LOSSES, L.CIFAR_LAYOUT).tables
    settings = QTSettings(budgets_ms=(0.6, 1.2), num_subnets=400, top_k=10, seed=3)
    own = qt_score(tables, best[0]["space"], settings)
    assert best[0]["score"] == own.score
    assert [b["p"] for b in best[0]["budgets"]] == [b.p for b in own.budgets]
    homogeneous = {h["block_type"]: h for h in record["homogeneous"]}
    assert set(homogeneous) == set(L.BLOCK_TYPES)
    for block_type, entry in homogeneous.items():
        assert entry["score"] == qt_score(tables, L.homogeneous_spaces()[list(L.BLOCK_TYPES).index(block_type)],
                                          settings).score
        assert entry["rank"] == 1 + sum(r["score"] > entry["score"] for r in rows)
    png = (run_dir / stage.EVOLUTION_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_percentile_budgets_are_resolved_and_recorded(tmp_path: Path) -> None:
    run_dir = _run(_recipe(tmp_path, budgets_ms=None, budget_percentiles=[25, 75], evaluations=8))
    record = json.loads((run_dir / stage.BEST_JSON).read_text())
    tables = stage.join_tables(LATENCY, LOSSES, L.CIFAR_LAYOUT).tables
    expected = stage.percentile_budgets(tables, [25, 75], 0.0, 3)
    assert record["budgets_ms"] == expected and expected[0] < expected[1]
    assert "percentiles [25, 75]" in record["budget_source"]


def test_missing_table_names_the_file_and_its_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "runs" / "spaceevo_distill_cifar10" / "losses.csv"
    assert main(["search", str(_recipe(tmp_path, losses=str(missing)))]) == 2
    err = capsys.readouterr().err
    assert "spaceevo.losses" in err and str(missing) in err
    assert "lightning-nas distill recipes/spaceevo_distill_cifar10.yaml" in err
    with pytest.raises(RecipeError, match="latency table .*nowhere.csv is missing") as error:
        _run(_recipe(tmp_path, latency=str(tmp_path / "nowhere.csv")))
    assert error.value.key == "spaceevo.latency" and "recipes/latency_lut_spaceevo.yaml" in str(error.value)
    assert not (tmp_path / "runs" / "se" / stage.BEST_JSON).exists()


def test_tables_that_do_not_cover_the_layout_are_refused(tmp_path: Path) -> None:
    with LOSSES.open() as stream:
        reader = csv.DictReader(stream)
        fields, rows = reader.fieldnames, [r for r in reader if (r["stage"], r["block_type"]) != ("3", "mbconv_se")]
    partial = tmp_path / "losses.csv"
    with partial.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(RecipeError, match="do not cover the layout") as error:
        _run(_recipe(tmp_path, losses=str(partial)))
    assert "stage 3, block_type mbconv_se" in error.value.key
    assert "missing from losses (recipes/spaceevo_distill_cifar10.yaml)" in error.value.message


def test_latency_table_of_another_target_needs_allow_mixed_targets(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="different deployment targets") as error:
        _run(_recipe(tmp_path, target="x86_vnni/torch"))
    assert error.value.key == "spaceevo.target"
    run_dir = _run(_recipe(tmp_path, target="x86_vnni/torch", allow_mixed_targets=True, evaluations=7))
    assert json.loads((run_dir / stage.BEST_JSON).read_text())["target"] == "x86_vnni/torch"


def test_rerun_replaces_the_outputs_with_the_same_result(tmp_path: Path) -> None:
    path = _recipe(tmp_path, evaluations=12)
    run_dir = _run(path)
    first_csv = (run_dir / stage.SPACES_CSV).read_bytes()
    first = json.loads((run_dir / stage.BEST_JSON).read_text())
    _run(path)
    assert (run_dir / stage.SPACES_CSV).read_bytes() == first_csv
    second = json.loads((run_dir / stage.BEST_JSON).read_text())
    first["evolution"].pop("seconds"), second["evolution"].pop("seconds")
    assert second == first
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize(("change", "key"), [
    ({"budget_percentiles": [50]}, "spaceevo"),
    ({"budgets_ms": None}, "spaceevo"),
    ({"budgets_ms": None, "budget_percentiles": [100]}, "spaceevo.budget_percentiles"),
    ({"sample_size": 11}, "spaceevo.sample_size"),
    ({"layout": "imagenet"}, "spaceevo.layout"),
    ({"populaton": 3}, "spaceevo.populaton"),  # recipe validation, when the recipe loads
])
def test_settings_are_checked(tmp_path: Path, change: dict, key: str) -> None:
    with pytest.raises(RecipeError) as error:
        _run(_recipe(tmp_path, **change))
    assert error.value.key == key


def test_a_recipe_with_both_search_sections_is_refused(tmp_path: Path) -> None:
    config = yaml.safe_load(_recipe(tmp_path).read_text())
    with pytest.raises(RecipeError, match="not both"):
        stage.load_settings({**config, "search": {"space": {}}})


if __name__ == "__main__":  # rewrite the committed fixture
    write_fixture_tables(FIXTURE)


def test_fixed_parts_default_to_the_profiled_stem_and_widest_head() -> None:
    meta = {"fixed_ms": {"stem": 0.25, "head": {"96": 0.5, "224": 0.75, "160": 0.625}}}
    assert stage.fixed_parts_ms(meta, None) == 1.0
    assert stage.fixed_parts_ms(meta, 0.125) == 0.125  # the recipe's number wins
    assert stage.fixed_parts_ms({}, None) == 0.0  # rows profiled without self-validation


def test_search_records_where_the_fixed_latency_came_from(tmp_path: Path) -> None:
    run_dir = _run(_recipe(tmp_path, evaluations=8))
    record = json.loads((run_dir / stage.BEST_JSON).read_text())
    # the fixture's latency meta has no fixed_ms and no validation
    assert record["fixed_latency_ms"] == 0.0 and record["fixed_latency_source"] == "none (0)"
    assert record["latency_validation"] is None
