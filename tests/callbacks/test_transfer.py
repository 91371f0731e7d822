"""PredictorTransfer trains the quantization-aware predictor from the fp32 one once the quantized pairs are in."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import fill_store

from lightning_nas.callbacks.transfer import PredictorTransfer
from lightning_nas.errors import RecipeError
from lightning_nas.predictors.accuracy import AccuracyPredictor, save_predictor
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.tasks.predictor import METRICS_FILE, PREDICTOR_FILE

SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10}


def finished_fit(run_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, default_root_dir=str(run_dir), loggers=[])


def test_transfer_trains_the_quant_predictor_from_the_fp32_one(tmp_path: Path) -> None:
    fp32 = AccuracyPredictor(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar").encoding_size, hidden=32, layers=2, base_accuracy=70.0)
    save_predictor(fp32, tmp_path / "fp32.pt", space="OFAMobileNetV3CifarSpace")
    fill_store(tmp_path / "pairs.sqlite", 150, "quant")
    callback = PredictorTransfer(fp32_predictor=str(tmp_path / "fp32.pt"), space=SPACE, hidden=32, layers=2,
                                 epochs=80, lr=3e-3)
    callback.on_fit_end(finished_fit(tmp_path), None)
    metrics = json.loads((tmp_path / "predictor_quant" / METRICS_FILE).read_text())
    assert metrics["kind"] == "quant" and metrics["transfer_from"] == str(tmp_path / "fp32.pt")
    assert metrics["train_pairs"] == 120 and metrics["kendall_tau"] > 0.3
    assert (tmp_path / "predictor_quant" / PREDICTOR_FILE).is_file()


def test_transfer_without_enough_quantized_pairs_says_why(tmp_path: Path) -> None:
    fill_store(tmp_path / "pairs.sqlite", 3, "quant")
    callback = PredictorTransfer(fp32_predictor=str(tmp_path / "fp32.pt"), space=SPACE)
    with pytest.raises(RecipeError, match="has 3 quantized pairs, fewer than min_pairs=10"):
        callback.on_fit_end(finished_fit(tmp_path), None)
