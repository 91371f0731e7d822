"""Supernet validation: every reference subnet's top-1 in percent over the whole validation set."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_nas.data.digits import DigitsDataModule
from lightning_nas.tasks.supernet import SUBNETS_CSV, SupernetTask

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10, "width_mult": 0.5, "resolutions": [16], "kernel_choices": [3, 5],
         "expand_choices": [3, 4], "depth_choices": [1, 2], "head_channels": 96, "feature_channels": 128}


def test_reference_subnets_are_validated_in_percent_over_every_image(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    task = SupernetTask(space=SPACE, lr=0.1, kd_ratio=0.0, num_reference_random=1, bn_recalibration_images=100,
                        bn_recalibration_batch=100, label_smoothing=0.0)
    data = DigitsDataModule(image_size=16, batch_size=64, num_workers=0, holdout_size=200)

    def trainer() -> pl.Trainer:
        return pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=1, limit_train_batches=6,
                          num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)

    trainer().fit(task, datamodule=data)
    # the logits of every supernet forward in a validation step (not in BN recalibration), in
    # reference-subnet order per batch
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    stepping = [False]
    handle = task.supernet.register_forward_hook(
        lambda module, args, out: logits.append(out.detach()) if stepping[0] else None)
    original = task.validation_step

    def recording_step(batch, batch_idx: int) -> None:
        labels.append(batch[1])
        stepping[0] = True
        original(batch, batch_idx)
        stepping[0] = False

    task.validation_step = recording_step
    validating = trainer()
    validating.validate(task, datamodule=data, verbose=False)
    handle.remove()
    names = list(task.reference_subnets)
    assert len(logits) == len(names) * len(labels) and len({len(y) for y in labels}) == 2  # a short last batch
    total = sum(len(y) for y in labels)
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / SUBNETS_CSV).open(newline=""))}
    assert list(rows) == names
    for i, name in enumerate(names):
        correct = sum(int((logits[b * len(names) + i].argmax(1) == y).sum()) for b, y in enumerate(labels))
        expected = 100.0 * correct / total
        assert float(validating.callback_metrics[f"val/acc@{name}"]) == pytest.approx(expected, abs=1e-4)
        assert float(rows[name]["top1"]) == pytest.approx(expected, abs=1e-4)
    mean = sum(float(r["top1"]) for r in rows.values()) / len(rows)
    assert float(validating.callback_metrics["val/acc"]) == pytest.approx(mean, abs=1e-4)
    assert float(validating.callback_metrics["val/acc"]) > 1.0  # as a fraction it would be below 1
