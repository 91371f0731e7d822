"""Train one fixed network with (label-smoothed) cross-entropy.

Logs ``train/loss``, ``train/acc`` (top-1 of the batch, percent), ``val/loss`` and ``val/acc``
(top-1 over the validation set, percent).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from ..nn.metrics import PercentAccuracy, percent_accuracy
from ..recipe.markers import ModelSpec
from .optim import build_optimizer, parameter_groups, step_scheduler


class ClassificationTask(pl.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        num_classes: int = 10,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 4e-5,
        label_smoothing: float = 0.1,
        schedule: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ..registry import MODELS

        self.model = MODELS.build(model, num_classes=num_classes)
        self.val_top1 = PercentAccuracy(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", percent_accuracy(logits, labels), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_top1.update(logits, labels)
        self.log("val/acc", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(parameter_groups(self.model, hp.weight_decay), hp.optimizer, hp.lr,
                                    hp.momentum, hp.nesterov)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, hp.schedule, total, warmup)}
