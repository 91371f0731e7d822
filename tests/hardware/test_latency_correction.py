"""The learned correction of the latency table's sum, on synthetic timings of a known structure:
whole-network latency = table sum x a resolution-dependent factor + a cost per (kernel, expand)
change between consecutive blocks, with multiplicative noise."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lightning_nas.hardware.cost_models import LatencyTableCostModel
from lightning_nas.hardware.latency_correction import (
    LatencyCorrection,
    TooFewSubnets,
    feature_names,
    fit_correction,
    improved,
)
from lightning_nas.hardware.latency_keys import UnitDecomposition
from lightning_nas.hardware.latency_model import TableLatencyModel, table_validation
from lightning_nas.hardware.latency_table import LatencyTable
from lightning_nas.hardware.latency_validation import (
    correct_table,
    correction_csv_path,
    fitting_configs,
    spearman,
    validate_table,
    validation_configs,
)
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

SPACE = {"kernel_choices": [3, 5], "expand_choices": [3, 6], "resolutions": [24, 32]}
FACTOR = {24: 1.0, 32: 1.5}  # the resolution-dependent factor of the truth
CHANGE_MS = 0.4  # the truth's cost of one (kernel, expand) change between consecutive blocks


@pytest.fixture(scope="module")
def space() -> OFAMobileNetV3Space:
    return OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", **SPACE)


@pytest.fixture(scope="module")
def units(space) -> UnitDecomposition:
    return UnitDecomposition(space)


def synthetic_table(units: UnitDecomposition, path: Path | None = None) -> LatencyTable:
    rng = random.Random(0)
    entries = {u.key: dict.fromkeys(("median", "mean"), rng.uniform(0.05, 0.5)) for u in units.all_units()}
    table = LatencyTable({"device": "test", "threads": 1, "batch_size": 1, "resolutions": [24, 32],
                          "target": "x86_avx2/torch"}, {"fp32": entries})
    if path is not None:
        table.save(path)
    return table


def truth(model: TableLatencyModel, configs) -> np.ndarray:
    """Noise-free whole-network latency of the known structure."""
    changes = model.features(configs)[:, feature_names(model.units.decomposition).index("choice_changes")]
    factor = np.array([FACTOR[c["r"]] for c in configs])
    return model.evaluate_table(configs) * factor + CHANGE_MS * changes


def measured_rows(model: TableLatencyModel, configs, noise: float, seed: int, structured: bool = True) -> list[dict]:
    exact = truth(model, configs) if structured else 1.3 * model.evaluate_table(configs)
    values = exact * (1 + noise * np.random.default_rng(seed).standard_normal(len(configs)))
    return [{"config": c, "fp32": float(v), "fp32_mean": float(v)} for c, v in zip(configs, values)]


def test_features_of_a_known_subnet(space, units) -> None:
    model = TableLatencyModel(space, synthetic_table(units), units=units)
    names = feature_names(units.decomposition)
    config = {"ks": [3, 5] * 10, "e": [3] * 20, "d": [2, 3, 4, 2, 3], "r": 32}
    (row,) = model.features([config])
    by_name = dict(zip(names, row))
    assert by_name["log_table_ms"] == pytest.approx(np.log(model.predict(config)))
    assert [by_name[f"stage{s}_depth"] for s in range(5)] == [2, 3, 4, 2, 3]
    assert (by_name["r24"], by_name["r32"]) == (0, 1)
    # kernels alternate 3, 5 within a stage and every stage starts at kernel 3: 1+2+3+1+2 changes
    # inside the stages, and one after each stage of even depth that another stage follows (3)
    assert by_name["choice_changes"] == 9 + 3
    shares = [by_name[f"stage{s}_share"] for s in range(5)]
    blocks = sum(model.table.value("fp32", u.key) for u in units.units(config)[2:-4])
    assert sum(shares) == pytest.approx(blocks / model.predict(config))


def test_the_correction_recovers_the_held_out_ranking_of_a_known_structure(space, units) -> None:
    model = TableLatencyModel(space, synthetic_table(units), units=units)
    held_out = validation_configs(space, 40, seed=0)
    fit = fitting_configs(space, 60, [24, 32], seed=1, exclude=held_out)
    assert len(fit) == 60 and not {json.dumps(c, sort_keys=True) for c in fit} & {
        json.dumps(c, sort_keys=True) for c in held_out}
    fit_rows, held_rows = measured_rows(model, fit, 0.03, 1), measured_rows(model, held_out, 0.03, 2)
    names = feature_names(units.decomposition)
    correction = fit_correction(model.features(fit), model.evaluate_table(fit), [r["fp32"] for r in fit_rows], names)
    measured = [r["fp32"] for r in held_rows]
    raw = model.evaluate_table(held_out)
    corrected = correction.apply(raw, model.features(held_out))
    ceiling = spearman(truth(model, held_out), measured)  # the noise-free truth against its noisy measurement
    assert spearman(raw, measured) < 0.75  # the plain sum ranks this structure poorly
    assert spearman(corrected, measured) >= ceiling - 0.02
    assert np.median(np.abs(corrected / measured - 1)) < 0.03 < np.median(np.abs(raw / measured - 1))
    assert correction.alpha is not None and correction.coef[names.index("choice_changes")] > 0
    # deterministic: the same subnets fit the same model, through its JSON record too
    again = fit_correction(model.features(fit), model.evaluate_table(fit), [r["fp32"] for r in fit_rows], names)
    assert again == correction == LatencyCorrection.from_record(json.loads(json.dumps(correction.to_record())))
    assert fitting_configs(space, 60, [24, 32], seed=1, exclude=held_out) == fit
    assert fitting_configs(space, 60, [24, 32], seed=2, exclude=held_out) != fit


def test_without_structure_the_correction_keeps_the_tables_ranking(space, units) -> None:
    model = TableLatencyModel(space, synthetic_table(units), units=units)
    held_out = validation_configs(space, 40, seed=0)
    fit = fitting_configs(space, 30, [24, 32], seed=1, exclude=held_out)
    fit_rows = measured_rows(model, fit, 0.02, 1, structured=False)  # 1.3 x the sum, and noise
    correction = fit_correction(model.features(fit), model.evaluate_table(fit), [r["fp32"] for r in fit_rows],
                                feature_names(units.decomposition))
    raw = model.evaluate_table(held_out)
    corrected = correction.apply(raw, model.features(held_out))
    assert spearman(corrected, raw) > 0.97 and np.median(corrected / raw) == pytest.approx(1.3, rel=0.02)
    with pytest.raises(ValueError, match="at least 3"):
        fit_correction(model.features(fit[:2]), raw[:2], raw[:2], feature_names(units.decomposition))


def test_improved_needs_no_worse_figures_and_one_better() -> None:
    raw = {"spearman": 0.6, "median_abs_pct_error": 10.0}
    assert improved(raw, {"spearman": 0.9, "median_abs_pct_error": 4.0})
    assert improved(raw, {"spearman": 0.6, "median_abs_pct_error": 9.0})
    assert not improved(raw, {"spearman": 0.6, "median_abs_pct_error": 10.0})
    assert not improved(raw, {"spearman": 0.95, "median_abs_pct_error": 11.0})
    assert not improved(raw, {"spearman": None, "median_abs_pct_error": 1.0})


def profiled(space, units, tmp_path: Path, apply: str, held_out_structured: bool = True):
    """A synthetic table, validated on 30 subnets and corrected on 40 others (measurements of the
    known structure; the held-out ones optionally proportional to the sum instead), and its path."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "table.json"
    model = TableLatencyModel(space, synthetic_table(units, path), units=units)
    held_out = validation_configs(space, 30, seed=0)
    validation = validate_table(space, path, measured_rows=measured_rows(model, held_out, 0.03, 2, held_out_structured),
                                precisions=["fp32"], min_spearman=0.9)
    fit = fitting_configs(space, 40, [24, 32], seed=1, exclude=held_out)
    result = correct_table(space, path, validation.rows, subnets=40, apply=apply,
                           measured_rows=measured_rows(model, fit, 0.03, 1))
    return path, validation, result


def test_correct_table_records_held_out_figures_and_cost_models_apply_it(space, units, tmp_path: Path) -> None:
    path, validation, result = profiled(space, units, tmp_path, "if_better")
    figures = result.figures("fp32")
    raw, corrected = figures["held_out"]["raw"], figures["held_out"]["corrected"]
    assert raw["spearman"] == pytest.approx(validation.figures("fp32")["spearman"])  # the same held-out subnets
    assert not raw["passed"] and corrected["passed"] and corrected["spearman"] > raw["spearman"] + 0.15
    assert figures["improved"] and figures["applied"]
    assert result.record["fit_subnets"] == 40 and result.record["held_out_subnets"] == 30
    assert result.record["seed"] == 1  # the validation's seed + 1
    saved = LatencyTable.load(path)
    assert saved.meta["correction"]["precisions"]["fp32"]["applied"] is True
    assert saved.meta["validation"]["passed"] is False  # the plain sum's own check stays as it was
    with correction_csv_path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["role"] for r in rows].count("fit") == 40 and [r["role"] for r in rows].count("held_out") == 30
    # the search's cost model predicts the corrected figures, and carries them with the raw ones
    spec = {"name": "ofa_mbv3_cifar", **SPACE}
    cost = LatencyTableCostModel(spec, str(path))
    plain = LatencyTableCostModel(spec, str(path), correction=False)
    held_out = [json.loads(r["config"]) for r in rows if r["role"] == "held_out"]
    predicted = cost.evaluate(held_out)["latency_ms"]
    assert predicted == pytest.approx([float(r["corrected_ms"]) for r in rows if r["role"] == "held_out"], rel=1e-5)
    assert plain.evaluate(held_out)["latency_ms"] == pytest.approx(
        [float(r["table_ms"]) for r in rows if r["role"] == "held_out"], rel=1e-5)
    carried = cost.validation["fp32"]
    assert carried["predictor"] == "table+correction" and carried["passed"] is True
    assert carried["spearman"] == pytest.approx(corrected["spearman"])
    assert carried["correction"]["applied"] and carried["correction"]["raw"]["spearman"] == pytest.approx(
        raw["spearman"])
    assert plain.validation["fp32"]["spearman"] == pytest.approx(raw["spearman"])
    assert plain.validation["fp32"]["correction"]["applied"] is False
    with pytest.raises(ValueError, match="fitted on the medians"):
        LatencyTableCostModel(spec, str(path), stat="mean")
    # a new validation outdates the correction
    validate_table(space, path, measured_rows=validation.rows, precisions=["fp32"])
    assert "correction" not in LatencyTable.load(path).meta


def test_the_recipe_decides_whether_a_correction_is_applied(space, units, tmp_path: Path) -> None:
    _, _, never = profiled(space, units, tmp_path / "never", "never")
    assert never.figures("fp32")["improved"] and not never.figures("fp32")["applied"]
    # held-out subnets proportional to the sum (which then ranks them right): a correction fitted on
    # the structure worsens their ranking, is recorded, and applied only when the recipe insists
    for apply in ("if_better", "always"):
        path, _, result = profiled(space, units, tmp_path / apply, apply, held_out_structured=False)
        figures = result.figures("fp32")
        held_out = figures["held_out"]
        assert not figures["improved"] and held_out["corrected"]["spearman"] < held_out["raw"]["spearman"]
        assert figures["applied"] == (apply == "always")
        configs = [r["config"] for r in result.rows if r["role"] == "held_out"]
        model = LatencyTableCostModel({"name": "ofa_mbv3_cifar", **SPACE}, str(path))
        expected = "corrected" if apply == "always" else "table"
        assert model.evaluate(configs)["latency_ms"] == pytest.approx(
            [r[f"fp32_{expected}"] for r in result.rows if r["role"] == "held_out"], rel=1e-9)
        assert model.validation["fp32"]["correction"]["applied"] == (apply == "always")


def test_a_table_without_correction_behaves_as_before(space, units, tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    model = TableLatencyModel(space, synthetic_table(units, path), units=units)
    configs = validation_configs(space, 20, seed=0)
    validate_table(space, path, measured_rows=measured_rows(model, configs, 0.03, 2), precisions=["fp32"])
    saved = LatencyTable.load(path)
    cost = LatencyTableCostModel({"name": "ofa_mbv3_cifar", **SPACE}, str(path))
    assert cost.models["fp32"].correction is None and cost.models["fp32"].correction_record is None
    assert (cost.evaluate(configs)["latency_ms"] == model.evaluate(configs)).all()
    assert (model.evaluate(configs) == model.evaluate_table(configs)).all()
    assert cost.validation["fp32"] == table_validation(saved, "fp32") and "correction" not in cost.validation["fp32"]


def test_correct_table_refuses_unvalidated_tables_and_shared_subnets(space, units, tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    model = TableLatencyModel(space, synthetic_table(units, path), units=units)
    configs = validation_configs(space, 10, seed=0)
    rows = measured_rows(model, configs, 0.0, 0)
    with pytest.raises(ValueError, match="no validation"):
        correct_table(space, path, rows, subnets=5, measured_rows=rows)
    validation = validate_table(space, path, measured_rows=rows, precisions=["fp32"])
    with pytest.raises(ValueError, match="also a validation subnet"):
        correct_table(space, path, validation.rows, subnets=10, measured_rows=rows)
    with pytest.raises(ValueError, match="apply"):
        correct_table(space, path, validation.rows, subnets=10, apply="sometimes", measured_rows=rows)


def test_a_space_with_too_few_other_subnets_is_refused_before_measuring(tmp_path: Path) -> None:
    tiny = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", kernel_choices=[3], expand_choices=[3],
                                           depth_choices=[2, 3], resolutions=[32])  # 2 ** 5 subnets
    units = UnitDecomposition(tiny)
    path = tmp_path / "table.json"
    LatencyTable({"resolutions": [32]}, {"fp32": {u.key: {"median": 0.1} for u in units.all_units()}}).save(path)
    model = TableLatencyModel(tiny, LatencyTable.load(path), units=units)
    configs = validation_configs(tiny, 30, seed=0)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 30
    validation = validate_table(tiny, path, measured_rows=measured_rows(model, configs, 0.0, 0), precisions=["fp32"])
    with pytest.raises(TooFewSubnets, match="only 2 subnets besides the validated ones"):
        correct_table(tiny, path, validation.rows, subnets=10)
