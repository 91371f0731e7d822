"""``lightning-nas profile``: the recipe's smoke run writes a complete table, validates it on whole
subnets, resumes, and shouts when the table fails its validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_nas.errors import RecipeError
from lightning_nas.hardware import latency_validation, profiling
from lightning_nas.hardware.latency_keys import space_units
from lightning_nas.hardware.latency_model import TableLatencyModel
from lightning_nas.hardware.latency_table import LatencyTable, cpu_name
from lightning_nas.recipe.loader import load_recipe
from lightning_nas.stages import profile
from lightning_nas.targets import detect_isa, resolve_target

RECIPE = "recipes/latency_lut_cpu.yaml"


def fake_chain(calls: list[int]):
    def chain(runners, x, *, warmup, repeats, threads=None, realtime=False):
        calls.append(len(runners))
        return [[0.1 + 0.01 * i + 0.001 * r for r in range(repeats)] for i in range(len(runners))]

    return chain


def smoke(run_dir: Path, *overrides: str):
    return load_recipe(RECIPE, [f"run_dir={run_dir}", *overrides], smoke=True)


def test_profile_smoke_writes_a_complete_validated_table_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_nas.registry import SPACES

    run_dir = tmp_path / "run"
    recipe = smoke(run_dir)
    assert profile.run(recipe) == run_dir
    space = SPACES.build(recipe.config["profile"]["space"])
    path = run_dir / "latency_table.json"
    table = LatencyTable.load(path)
    keys = {u.key for u in space_units(space, [32])}
    assert table.keys("fp32") == table.keys("int8") == keys  # the smoke's tiny space: complete
    host = resolve_target("auto")
    assert table.meta["device"] == cpu_name() and table.meta["threads"] == 1 and table.meta["batch_size"] == 1
    assert table.meta["target"] == host.name and table.meta["quantized_engine"] == host.engine
    for precision in ("fp32", "int8"):
        for entry in table.entries[precision].values():
            assert entry["count"] % 3 == 0 and 0 < entry["median"] < 1000  # shared keys pool

    validation = table.meta["validation"]
    assert validation["subnets"] == 4 and validation["min_spearman"] == 0.9 and validation["target"] == host.name
    for precision in ("fp32", "int8"):
        figures = validation["precisions"][precision]
        assert figures["median_abs_pct_error"] >= 0 and figures["measured_ms_min"] > 0
        spearman = figures["spearman"]
        assert figures["passed"] == (spearman is not None and spearman >= 0.9)
    assert validation["passed"] == all(f["passed"] for f in validation["precisions"].values())
    with (run_dir / "latency_table_validation.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2
    model = TableLatencyModel(space, table, "fp32", resolutions=[32])
    for row in rows:
        if row["precision"] == "fp32":
            assert float(row["predicted_ms"]) == pytest.approx(model.predict(json.loads(row["config"])), rel=1e-4)

    # the learned correction: fitted on 3 further subnets, judged on the 4 validated ones
    correction = table.meta["correction"]
    assert correction["fit_subnets"] == 3 and correction["held_out_subnets"] == 4 and correction["seed"] == 1
    with (run_dir / "latency_table_correction.csv").open(newline="") as handle:
        correction_rows = list(csv.DictReader(handle))
    assert len(correction_rows) == (3 + 4) * 2
    validated = {r["config"] for r in rows}
    assert {r["config"] for r in correction_rows if r["role"] == "held_out"} == validated
    assert not {r["config"] for r in correction_rows if r["role"] == "fit"} & validated
    for precision in ("fp32", "int8"):
        figures = correction["precisions"][precision]
        assert figures["held_out"]["raw"]["spearman"] == validation["precisions"][precision]["spearman"]
        assert figures["applied"] == figures["improved"]  # the recipe's apply_correction: if_better
        assert len(figures["model"]["coef"]) == len(figures["model"]["features"])
    captured = capsys.readouterr()
    assert "correction fitted on 3 further whole subnets, judged on the 4 validation subnets" in captured.out

    # again after losing three entries: one profiling network is timed, nothing validated (subnets 0)
    record = json.loads(path.read_text())
    for key in sorted(record["entries"]["fp32"])[:3]:
        del record["entries"]["fp32"][key]
    path.write_text(json.dumps(record))
    calls: list[int] = []
    monkeypatch.setattr(profiling, "time_chain", fake_chain(calls))
    profile.run(smoke(run_dir, "profile.precisions=[fp32]", "profile.validation_subnets=0",
                      "profile.correction_subnets=0"))
    assert len(calls) == 1 and LatencyTable.load(path).keys("fp32") == keys


def test_a_table_below_the_threshold_is_marked_failed_and_warned(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiling, "time_chain", fake_chain([]))

    def reversed_ranks(space, configs, precisions, **kwargs):  # whole subnets ranked against the table
        model = {p: TableLatencyModel(space, LatencyTable.load(tmp_path / "run" / "latency_table.json"), p,
                                      resolutions=[32]) for p in precisions}
        return [{"config": c, **{p: 100.0 - model[p].predict(c) for p in precisions}} for c in configs]

    monkeypatch.setattr(latency_validation, "measure_subnets", reversed_ranks)
    profile.run(smoke(tmp_path / "run", "profile.validation_subnets=8"))
    captured = capsys.readouterr()
    assert "latency table FAILED validation" in captured.err and "Spearman >= 0.9" in captured.err
    assert "validation fp32 on 8 whole subnets: Spearman -" in captured.out and "(FAILED)" in captured.out
    validation = LatencyTable.load(tmp_path / "run" / "latency_table.json").meta["validation"]
    assert validation["passed"] is False and validation["precisions"]["int8"]["passed"] is False
    assert validation["precisions"]["fp32"]["spearman"] < -0.9


def test_an_incomplete_table_is_not_validated_and_another_cpu_kind_is_refused(tmp_path: Path, capsys,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiling, "time_chain", fake_chain([]))
    profile.run(smoke(tmp_path / "run", "space.kernel_choices=[3,5]", "profile.limit=1", "profile.precisions=[fp32]"))
    assert "validation on whole subnets runs once the table is complete" in capsys.readouterr().out
    assert "validation" not in LatencyTable.load(tmp_path / "run" / "latency_table.json").meta
    other = "arm/torch" if detect_isa() != "arm" else "x86_vnni/torch"
    with pytest.raises(RecipeError, match=rf"profile.target: .*target {other} is another CPU kind"):
        profile.run(smoke(tmp_path / "other", f"deploy.target={other}"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["profile.validation_subnets=0"], "judged on the validation subnets"),
    (["profile.correction_subnets=2"], "too few subnets"),
])
def test_a_correction_needs_validation_and_enough_subnets(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message) as error:
        profile.run(smoke(tmp_path / "run", *overrides))
    assert error.value.key == "profile.correction_subnets"
    assert not (tmp_path / "run" / "latency_table.json").exists()  # refused before measuring anything


SPACEEVO_RECIPE = "recipes/latency_lut_spaceevo.yaml"


def test_spaceevo_profile_smoke_writes_rows_and_resumes(tmp_path: Path) -> None:
    from lightning_nas.hardware.spaceevo_latency import read_latency_rows, sample_substages
    from lightning_nas.spaces.spaceevo_layout import CIFAR_LAYOUT

    run_dir = tmp_path / "run"
    recipe = load_recipe(SPACEEVO_RECIPE, [f"run_dir={run_dir}"], smoke=True)
    assert profile.run(recipe) == run_dir
    (row,) = read_latency_rows(run_dir / profile.SPACEEVO_FILE)
    (planned,) = sample_substages(CIFAR_LAYOUT, 3, "mbconv", 1)
    assert (int(row["stage"]), row["block_type"], int(row["width"]), int(row["depth"])) == (
        3, "mbconv", planned.width, planned.depth)
    assert (int(row["in_channels"]), int(row["in_size"])) == (112, 4) and float(row["latency_ms"]) > 0
    meta = json.loads((run_dir / (profile.SPACEEVO_FILE + ".meta.json")).read_text())
    assert meta["target"] == resolve_target("auto").name and meta["samples_per_cell"] == 1
    assert "validation" not in meta  # one cell: no whole subnet can be made of the rows
    # run again: nothing left to measure, the row is kept as it was
    profile.run(load_recipe(SPACEEVO_RECIPE, [f"run_dir={run_dir}"], smoke=True))
    assert read_latency_rows(run_dir / profile.SPACEEVO_FILE) == [row]


@pytest.mark.parametrize(("overrides", "key"), [
    (["profile.spaceevo.block_types=[resnet]"], "profile.spaceevo.block_types"),
    (["profile.spaceevo.stages=[7]"], "profile.spaceevo.stages"),
    (["profile.rounds=2"], "profile.rounds"),
    (["profile.correction_subnets=5"], "profile.correction_subnets"),
    (["+profile.space={name: ofa_mbv3_cifar}"], "profile"),
])
def test_spaceevo_profile_recipe_errors_name_the_key(tmp_path: Path, overrides: list[str], key: str) -> None:
    with pytest.raises(RecipeError) as error:
        profile.run(load_recipe(SPACEEVO_RECIPE, [f"run_dir={tmp_path}", *overrides], smoke=True))
    assert error.value.key == key
