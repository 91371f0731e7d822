"""Train a once-for-all supernet: sampled subnets per step, distillation, reference validation.

The phase (which dimensions are elastic, learning rate, subnets per step) is set by the
:class:`~lightning_nas.callbacks.shrinking.ProgressiveShrinking` callback; without it the task
trains the full network. Optimisation is manual because every step runs several subnets whose
gradients accumulate into one optimizer step.
"""

from __future__ import annotations

import copy
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..callbacks.phases import ShrinkingPhase
from ..files import append_line, replacing
from ..nn.bn_recalibration import recalibrate_batchnorm
from ..nn.shrinking import shrinking_step
from ..recipe.markers import ExistingFile, SpaceSpec
from .optim import build_optimizer, warmup_cosine

SUBNETS_CSV = "subnets.csv"


@dataclass
class ActivePhase:
    index: int
    phase: ShrinkingPhase
    start_epoch: int
    sampler: Any  # a space whose choices are this phase's (it only samples)


def holdout_batches(datamodule: Any, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``num_images`` held-out training images as uint8 batches (kept for reuse)."""
    batches, seen = [], 0
    for images, _ in datamodule.holdout_dataloader(batch_size=batch_size):
        batches.append(images[: num_images - seen])
        seen += len(batches[-1])
        if seen >= num_images:
            break
    if not batches:
        raise ValueError("BN recalibration needs held-out images: set data.holdout_size > 0")
    return batches


class SupernetTask(pl.LightningModule):
    """Once-for-all training of an elastic supernet from a registered space."""

    def __init__(
        self,
        space: SpaceSpec,
        lr: float = 0.1,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 3e-5,
        label_smoothing: float = 0.1,
        kd_ratio: float = 1.0,
        teacher_path: ExistingFile | None = None,
        warmup_epochs: float = 0.0,
        sample_seed: int = 0,
        num_reference_random: int = 3,
        reference_seed: int = 0,
        bn_recalibration_images: int = 2000,
        bn_recalibration_batch: int = 200,
        channels_last: bool = False,
        record_subnets: bool = False,
        init_checkpoint: ExistingFile | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ..registry import SPACES

        self.space = SPACES.build(space)
        self.supernet = self.space.build_supernet()
        if init_checkpoint:
            self.load_supernet_weights(init_checkpoint)
        if channels_last:
            self.supernet = self.supernet.to(memory_format=torch.channels_last)
        self.automatic_optimization = False
        # Every rank trains in the same order of subnets; DDP must tolerate parameters a subnet skips.
        self.ddp_find_unused_parameters = True
        self.reference_subnets = self.space.reference_subnets(num_reference_random, reference_seed)
        self.active: ActivePhase | None = None
        self._teacher: list[nn.Module] = []  # a list keeps it out of the state dict and of DDP
        self._val_correct: torch.Tensor | None = None
        self._val_total = 0
        self._bn_states: dict[str, dict[str, torch.Tensor]] = {}

    def load_supernet_weights(self, path: str) -> None:
        """Start from the weights of another supernet run (same space), e.g. to collect pairs."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        theirs = checkpoint.get("hyper_parameters", {}).get("space")
        if theirs is not None and dict(theirs) != dict(self.hparams.space):
            raise ValueError(f"init_checkpoint {path} was trained on space {dict(theirs)}, not {dict(self.hparams.space)}")
        weights = {k.removeprefix("supernet."): v for k, v in checkpoint["state_dict"].items()
                   if k.startswith("supernet.")}
        self.supernet.load_state_dict(weights)
        if "teacher" in checkpoint:
            self.set_teacher(checkpoint["teacher"])

    # --- phases -------------------------------------------------------------------------------
    def full_network_phase(self) -> ShrinkingPhase:
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        return ShrinkingPhase(name="full", epochs=epochs, lr=self.hparams.lr, warmup_epochs=self.hparams.warmup_epochs)

    def set_phase(self, index: int, phase: ShrinkingPhase, start_epoch: int) -> None:
        space = self.space
        choices = {
            "kernel_choices": phase.kernel or [max(space.kernel_choices)],
            "expand_choices": phase.expand or [max(space.expand_choices)],
            "depth_choices": phase.depth or [max(space.depth_choices)],
        }
        for key, values in choices.items():
            unknown = sorted(set(values) - set(getattr(space, key)))
            if unknown:
                raise ValueError(f"phase '{phase.name}': {key.split('_')[0]} choices {unknown} are not in the "
                                 f"space (allowed: {getattr(space, key)})")
        sampler = type(space)(**{**space.hparams(), **choices})
        self.active = ActivePhase(index, phase, start_epoch, sampler)
        if phase.elastic and self.kd_ratio > 0 and not self._teacher:
            self.set_teacher(self._load_teacher() if self.hparams.teacher_path else self.supernet.extract(space.largest()))

    @property
    def kd_ratio(self) -> float:
        phase = self.active.phase if self.active else None
        if phase is None or not phase.elastic:
            return 0.0
        return self.hparams.kd_ratio if phase.kd_ratio is None else phase.kd_ratio

    def set_teacher(self, teacher: nn.Module) -> None:
        teacher = teacher.to(self.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self._teacher = [teacher]

    def _load_teacher(self) -> nn.Module:
        loaded = torch.load(self.hparams.teacher_path, map_location="cpu", weights_only=False)
        return loaded["model"] if isinstance(loaded, dict) and "model" in loaded else loaded

    def sample_subnets(self, resolution: int) -> list[dict]:
        """This step's subnets: seeded by the global step, so every rank draws the same ones."""
        assert self.active is not None
        configs = []
        for k in range(self.active.phase.subnets_per_step):
            config = self.active.sampler.sample(random.Random(f"{self.hparams.sample_seed}-{self.global_step}-{k}"))
            config["r"] = resolution
            configs.append(config)
        return configs

    def current_lr(self) -> float:
        assert self.active is not None
        phase = self.active.phase
        steps_per_epoch = max(1, int(self.trainer.num_training_batches))
        total = phase.epochs * steps_per_epoch
        step = self.global_step - self.active.start_epoch * steps_per_epoch
        return phase.lr * warmup_cosine(total, int(phase.warmup_epochs * steps_per_epoch))(max(0, step))

    # --- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.active is None:  # no ProgressiveShrinking callback: train the full network
            self.set_phase(0, self.full_network_phase(), 0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # Dropout masks as a function of the step: a resumed run repeats the uninterrupted one.
        torch.manual_seed(self.hparams.sample_seed * 1_000_003 + self.global_step)
        optimizer = self.optimizers()
        lr = self.current_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        configs = self.sample_subnets(int(images.shape[-1]))
        teacher_logits = None
        if self.kd_ratio > 0 and self._teacher:
            with torch.no_grad():
                teacher_logits = self._teacher[0](images)
        if self.trainer.world_size > 1:
            # DDP synchronises gradients once per forward of the wrapped module: one backward.
            losses: list[torch.Tensor] = []
            stats = shrinking_step(self.supernet, images, labels, configs, teacher_logits, self.kd_ratio,
                                   self.hparams.label_smoothing, backward=losses.append)
            self.manual_backward(torch.stack(losses).sum())
        else:
            stats = shrinking_step(self.supernet, images, labels, configs, teacher_logits, self.kd_ratio,
                                   self.hparams.label_smoothing, backward=self.manual_backward)
        if self.hparams.record_subnets:  # before the step: it is labelled with the step that sampled it
            self._record(configs)
        optimizer.step()
        self.log("train/loss", stats["loss"], prog_bar=True)
        self.log("train/acc", stats["top1"], prog_bar=True)
        self.log("train/lr", lr)
        self.log("train/phase", float(self.active.index))
        return stats["loss"]

    def _record(self, configs: list[dict]) -> None:
        path = Path(self.trainer.default_root_dir) / f"sampled_subnets_rank{self.global_rank}.jsonl"
        append_line(path, json.dumps({"step": self.global_step, "subnets": configs}))

    def configure_optimizers(self):
        groups = self.supernet.param_groups(self.hparams.weight_decay)
        return build_optimizer(groups, self.hparams.optimizer, self.hparams.lr, self.hparams.momentum,
                               self.hparams.nesterov)

    # --- validation: reference subnets after BN recalibration ------------------------------------
    def _recalibrated_bn_states(self) -> dict[str, dict[str, torch.Tensor]]:
        datamodule = self.trainer.datamodule
        batches = holdout_batches(datamodule, self.hparams.bn_recalibration_images, self.hparams.bn_recalibration_batch)
        saved = {k: v.clone() for k, v in self.supernet.state_dict().items() if "running_" in k or "num_batches" in k}
        states = {}
        for name, config in self.reference_subnets.items():
            self.supernet.set_active(config)
            inputs = (datamodule.normalize(b.to(self.device), config["r"]) for b in batches)
            recalibrate_batchnorm(self.supernet, inputs)
            states[name] = {k: v.clone() for k, v in self.supernet.state_dict().items() if k in saved}
        self.supernet.load_state_dict(saved, strict=False)
        return states

    def on_validation_epoch_start(self) -> None:
        self._bn_states = self._recalibrated_bn_states()
        self._training_bn = {k: v.clone() for k, v in self.supernet.state_dict().items() if k in
                             next(iter(self._bn_states.values()))}
        self._val_correct = torch.zeros(len(self.reference_subnets), device=self.device)
        self._val_loss = torch.zeros(len(self.reference_subnets), device=self.device)
        self._val_total = torch.zeros((), device=self.device)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        for i, (name, config) in enumerate(self.reference_subnets.items()):
            self.supernet.load_state_dict(self._bn_states[name], strict=False)
            self.supernet.set_active(config)
            inputs = images if images.shape[-1] == config["r"] else F.interpolate(
                images, size=(config["r"], config["r"]), mode="bilinear", align_corners=False)
            logits = self.supernet(inputs)
            self._val_correct[i] += (logits.argmax(1) == labels).sum()
            self._val_loss[i] += F.cross_entropy(logits, labels, reduction="sum")
        self._val_total += len(labels)

    def on_validation_epoch_end(self) -> None:
        self.supernet.load_state_dict(self._training_bn, strict=False)
        correct = self.trainer.strategy.reduce(self._val_correct, reduce_op="sum")
        losses = self.trainer.strategy.reduce(self._val_loss, reduce_op="sum")
        total = self.trainer.strategy.reduce(self._val_total, reduce_op="sum").clamp_min(1)
        rows = []
        for i, (name, config) in enumerate(self.reference_subnets.items()):
            top1 = float(correct[i] / total) * 100
            self.log(f"val/acc@{name}", top1, prog_bar=name in {"smallest", "largest"}, sync_dist=False)
            self.log(f"val/loss@{name}", float(losses[i] / total), sync_dist=False)
            rows.append({"name": name, "config": json.dumps(config), "resolution": config["r"],
                         "macs": self.space.macs(config), "params": self.space.params(config),
                         "top1": round(top1, 4)})
        self.log("val/acc", sum(r["top1"] for r in rows) / len(rows), sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = Path(self.trainer.default_root_dir) / SUBNETS_CSV
            with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    # --- checkpoints: the teacher and the phase travel with the weights -------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._teacher:
            checkpoint["teacher"] = copy.deepcopy(self._teacher[0]).cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "teacher" in checkpoint:
            self.set_teacher(checkpoint["teacher"])
