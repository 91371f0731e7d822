"""The fixed-network task logs its accuracies in percent, val/acc over the whole validation set."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_nas.data.digits import DigitsDataModule
from lightning_nas.tasks.classification import ClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingTask(ClassificationTask):
    """Keeps what each step saw, to recompute its accuracies by hand."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():  # train mode, no dropout in this network: the logits the step used
            self.seen["train"].append((self(batch[0]), batch[1]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.seen["val"].append((self(batch[0]).detach(), batch[1]))
        super().validation_step(batch, batch_idx)


def percent(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int((logits.argmax(1) == labels).sum()) for logits, labels in pairs)
    return 100.0 * correct / sum(len(labels) for _, labels in pairs)


def test_train_and_val_accuracy_are_percent_val_over_every_image(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    task = RecordingTask(model={"name": "cifar_resnet", "depth": 8, "width": 8}, lr=0.1, label_smoothing=0.0,
                         schedule="constant")
    data = DigitsDataModule(image_size=16, batch_size=64, num_workers=0, holdout_size=0)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=1, limit_train_batches=8,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    # the last step's batch accuracy, in percent
    assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(percent(task.seen["train"][-1:]), abs=1e-4)
    val = task.seen["val"]
    sizes = {len(labels) for _, labels in val}
    assert len(sizes) == 2  # a short last batch: the figure is correct images over all images
    expected = percent(val)
    assert 1.0 < expected < 100.0  # as a fraction it would be below 1
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(expected, abs=1e-4)
