"""Predictors on a synthetic pair set with a known ranking; transfer loads the fp32 weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import fill_store

from lightning_nas.data.pairs import PairsDataModule
from lightning_nas.predictors.accuracy import AccuracyPredictor, QuantAccuracyPredictor, load_predictor
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.tasks.predictor import METRICS_FILE, PREDICTOR_FILE, SCATTER_FILE, PredictorTask

SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10}


def fit(tmp_path: Path, kind: str, epochs: int, transfer_from: str | None = None, max_train: int | None = None):
    data = PairsDataModule(path=str(tmp_path / "pairs.sqlite"), space=SPACE, kind=kind, batch_size=64,
                           max_train_pairs=max_train)
    task = PredictorTask(hidden=64, layers=2, lr=3e-3, transfer_from=transfer_from)
    run_dir = tmp_path / kind
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=str(run_dir), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, datamodule=data)
    return task, json.loads((run_dir / METRICS_FILE).read_text()), run_dir


def test_fp32_predictor_beats_a_constant_on_a_known_ranking(tmp_path: Path) -> None:
    pl.seed_everything(0)
    fill_store(tmp_path / "pairs.sqlite", 400, "fp32")
    task, metrics, run_dir = fit(tmp_path, "fp32", epochs=40)
    data_std = float(torch.tensor(task.final_metrics["measured"]).std())
    assert metrics["rmse"] < 0.5 * data_std  # a constant (the mean) has RMSE ~ std
    assert metrics["kendall_tau"] > 0.6 and metrics["spearman"] > 0.8
    assert (run_dir / SCATTER_FILE).stat().st_size > 0
    assert isinstance(load_predictor(run_dir / PREDICTOR_FILE), AccuracyPredictor)


def test_transfer_loads_the_fp32_weights_by_value(tmp_path: Path) -> None:
    fp32 = AccuracyPredictor(arch_features=OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar").encoding_size, hidden=64, layers=2,
                             base_accuracy=71.5)
    torch.nn.init.normal_(fp32.first.weight)
    quant = QuantAccuracyPredictor(fp32.arch_features, policy_features=10, hidden=64, layers=2)
    quant.inherit(fp32)
    assert torch.equal(quant.first.weight, fp32.first.weight)
    assert torch.equal(quant.rest[-1].weight, fp32.rest[-1].weight)
    assert float(quant.base_accuracy) == pytest.approx(71.5)
    arch = torch.rand(5, fp32.arch_features)
    torch.testing.assert_close(quant(arch, torch.rand(5, 10)), fp32(arch))  # zero policy branch
    with pytest.raises(ValueError, match="cannot transfer"):
        QuantAccuracyPredictor(fp32.arch_features, 10, hidden=32, layers=2).inherit(fp32)


def test_quant_predictor_trains_with_transfer(tmp_path: Path) -> None:
    pl.seed_everything(0)
    fill_store(tmp_path / "pairs.sqlite", 300, "fp32")
    fit(tmp_path, "fp32", epochs=30)
    fill_store(tmp_path / "pairs.sqlite", 120, "quant", seed=1)
    task, metrics, _ = fit(tmp_path, "quant", epochs=30, transfer_from=str(tmp_path / "fp32" / PREDICTOR_FILE))
    assert isinstance(task.predictor, QuantAccuracyPredictor)
    assert metrics["kind"] == "quant" and metrics["kendall_tau"] > 0.3
