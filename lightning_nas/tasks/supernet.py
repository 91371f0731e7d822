"""Train a once-for-all supernet: sampled subnets per step, distillation, reference validation.

The phase (which dimensions are elastic, learning rate, subnets per step) is set by the
:class:`~lightning_nas.callbacks.shrinking.ProgressiveShrinking` callback; without it the task
trains the full network. Optimisation is manual because every step runs several subnets whose
gradients accumulate into one optimizer step.

Logged accuracies are top-1 in percent: ``train/acc`` (the mean over the step's subnets, on the
batch), ``val/acc@NAME`` (each reference subnet over the validation set, after batch-norm
recalibration; also the ``top1`` column of ``subnets.csv``) and ``val/acc`` (their mean).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nas.nn.builders import build_subnet, build_supernet

from ..errors import RecipeError
from ..files import append_line, replacing
from ..nn.bn_recalibration import recalibrate_batchnorm
from ..nn.metrics import PercentAccuracy
from ..nn.safe_load import load_torch_file, require_mapping
from ..nn.shrinking import shrinking_step
from ..recipe.markers import (
    ExistingFile,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SpaceSpec,
)
from .optim import build_optimizer, warmup_cosine
from .phases import ShrinkingPhase

SUBNETS_CSV = "subnets.csv"
TEACHER_KEY = "teacher"
SUBNET_FILE_DESCRIPTION = "a subnet.pt of `lightning-nas export` (space, config, state_dict)"


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
        raise RecipeError("BN recalibration needs held-out images", key="data.holdout_size", given=0,
                          allowed="a positive number of held-out training images")
    return batches


class SupernetTask(pl.LightningModule):
    """Once-for-all training of an elastic supernet from a registered space."""

    def __init__(
        self,
        space: SpaceSpec,
        lr: PositiveFloat = 0.1,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: NonNegativeFloat = 0.9,
        nesterov: bool = True,
        weight_decay: NonNegativeFloat = 3e-5,
        label_smoothing: Fraction = 0.1,
        kd_ratio: NonNegativeFloat = 1.0,
        teacher_path: ExistingFile | None = None,
        warmup_epochs: NonNegativeFloat = 0.0,
        sample_seed: int = 0,
        num_reference_random: NonNegativeInt = 3,
        reference_seed: int = 0,
        bn_recalibration_images: PositiveInt = 2000,
        bn_recalibration_batch: PositiveInt = 200,
        channels_last: bool = False,
        record_subnets: bool = False,
        init_checkpoint: ExistingFile | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ..registry import SPACES

        self.space = SPACES.build(space)
        self.supernet = build_supernet(self.space)
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
        self._teacher_record: dict[str, Any] = {}
        # one accumulated top-1 per reference subnet; torchmetrics sums it over DDP ranks
        self.val_top1 = nn.ModuleList(PercentAccuracy(self.space.num_classes) for _ in self.reference_subnets)
        self._val_total = 0
        self._bn_states: dict[str, dict[str, torch.Tensor]] = {}

    def load_supernet_weights(self, path: str) -> None:
        """Start from the weights of another supernet run (same space), e.g. to collect pairs."""
        checkpoint = read_supernet_checkpoint(path, "task.init_checkpoint")
        theirs = checkpoint["hyper_parameters"]["space"]
        if dict(theirs) != dict(self.hparams.space):
            raise RecipeError("the checkpoint was trained on another space", key="task.init_checkpoint",
                              given=path, allowed=f"a supernet checkpoint of the space {dict(self.hparams.space)} "
                              f"(this one's: {dict(theirs)})")
        weights = {k.removeprefix("supernet."): v for k, v in checkpoint["state_dict"].items()
                   if k.startswith("supernet.")}
        self.supernet.load_state_dict(weights)
        if TEACHER_KEY in checkpoint:
            self.set_teacher(*rebuild_network(checkpoint[TEACHER_KEY], path=path, key="task.init_checkpoint"))

    @classmethod
    def from_checkpoint_file(cls, path: str, key: str) -> SupernetTask:
        """The task saved in a supernet checkpoint (read without pickle, see :mod:`..nn.safe_load`)."""
        checkpoint = read_supernet_checkpoint(path, key)
        task = cls(**checkpoint["hyper_parameters"])
        task.on_load_checkpoint(checkpoint)
        try:
            task.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:  # the hyperparameters and the weights disagree: a damaged file
            raise RecipeError(f"the checkpoint's weights do not fit its own space ({str(error).splitlines()[0]})",
                              key=key, given=path) from None
        return task.eval()

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
                raise RecipeError(f"phase '{phase.name}': {key.split('_')[0]} choices {unknown} are not in the "
                                  "space", key=f"callbacks.progressive_shrinking.init_args.phases[{index}]",
                                  given=values, allowed=f"values of the space's {key}: {getattr(space, key)}")
        sampler = type(space)(**{**space.hparams(), **choices})
        self.active = ActivePhase(index, phase, start_epoch, sampler)
        if phase.elastic and self.kd_ratio > 0 and not self._teacher:
            if self.hparams.teacher_path:
                self.set_teacher(*self._load_teacher())
            else:
                largest = space.largest()
                self.set_teacher(self.supernet.extract(largest), self.hparams.space, largest)

    @property
    def kd_ratio(self) -> float:
        phase = self.active.phase if self.active else None
        if phase is None or not phase.elastic:
            return 0.0
        return self.hparams.kd_ratio if phase.kd_ratio is None else phase.kd_ratio

    def set_teacher(self, teacher: nn.Module, space: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """The distillation teacher, with the space spec and config that rebuild it from a checkpoint."""
        teacher = teacher.to(self.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self._teacher = [teacher]
        self._teacher_record = {"space": dict(space), "config": dict(config)}

    def _load_teacher(self) -> tuple[nn.Module, dict, dict]:
        path = self.hparams.teacher_path
        saved = load_torch_file(path, key="task.teacher_path", what=SUBNET_FILE_DESCRIPTION)
        return rebuild_network(saved, path=path, key="task.teacher_path")

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
        for metric in self.val_top1:
            metric.reset()
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
            self.val_top1[i].update(logits, labels)
            self._val_loss[i] += F.cross_entropy(logits, labels, reduction="sum")
        self._val_total += len(labels)

    def on_validation_epoch_end(self) -> None:
        self.supernet.load_state_dict(self._training_bn, strict=False)
        losses = self.trainer.strategy.reduce(self._val_loss, reduce_op="sum")
        total = self.trainer.strategy.reduce(self._val_total, reduce_op="sum").clamp_min(1)
        rows = []
        for i, (name, config) in enumerate(self.reference_subnets.items()):
            top1 = float(self.val_top1[i].compute())
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
    # Stored as space, config and state dict, so the checkpoint loads with weights_only=True.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._teacher:
            checkpoint[TEACHER_KEY] = network_record(self._teacher[0], **self._teacher_record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        teacher = checkpoint.get(TEACHER_KEY)
        if isinstance(teacher, nn.Module):  # an older checkpoint, read with allow_pickle: the module itself
            space = getattr(teacher, "space", None)
            self.set_teacher(teacher, {"name": space.name, **space.hparams()} if space is not None else {},
                             getattr(teacher, "config", {}))
        elif teacher is not None:
            self.set_teacher(*rebuild_network(teacher, path="the checkpoint", key="ckpt_path"))


def read_supernet_checkpoint(path: str, key: str) -> dict[str, Any]:
    """A checkpoint of ``lightning-nas fit`` with a supernet recipe, read without pickle and checked."""
    what = "a checkpoint written by `lightning-nas fit` of a supernet recipe"
    checkpoint = load_torch_file(path, key=key, what=what)
    require_mapping(checkpoint, ("state_dict", "hyper_parameters"), path=path, key=key, what=what)
    hparams = checkpoint["hyper_parameters"]
    if not isinstance(hparams, Mapping) or not isinstance(hparams.get("space"), Mapping):
        raise RecipeError("not a supernet checkpoint: its hyperparameters name no space", key=key, given=path,
                          allowed=what)
    return checkpoint


def network_record(model: nn.Module, space: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A standalone subnet as plain data: what :func:`rebuild_network` needs."""
    return {"space": dict(space), "config": dict(config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def rebuild_network(saved: Any, *, path: str, key: str) -> tuple[nn.Module, dict, dict]:
    """(network, space spec, config) from a :func:`network_record` (a ``subnet.pt`` of export)."""
    from ..registry import SPACES

    require_mapping(saved, ("space", "config", "state_dict"), path=path, key=key, what=SUBNET_FILE_DESCRIPTION)
    try:
        space = SPACES.build(saved["space"])
        config = space.canonical(space.validate(saved["config"]))
    except (ValueError, TypeError, KeyError) as error:  # the file's data, not the code, is wrong
        raise RecipeError(f"the file's space or config cannot be built ({error})", key=key, given=str(path),
                          allowed=SUBNET_FILE_DESCRIPTION) from None
    model = build_subnet(space, config)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise RecipeError(f"the subnet's weights do not fit its config ({str(error).splitlines()[0]})", key=key,
                          given=str(path)) from None
    return model, dict(saved["space"]), config
