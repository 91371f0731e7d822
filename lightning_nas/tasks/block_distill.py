"""SpaceEvo's quantization term: block-wise distillation of one (stage, block type) cell.

A frozen teacher (the largest subnet of the once-for-all CIFAR supernet, or any network with
``forward_stages``) gives, per batch, the input and the output of stage ``s``. The student is the
cell's :class:`~lightning_nas.nn.spaceevo_blocks.ElasticStage` between two 1x1 projections:

* ``project_in`` maps the teacher's stage input channels to the stage's *largest* input width
  (the stem's channels for stage 0, else the previous stage's largest width). It is fixed: the
  loss table has no input-width column, so every sub-stage of a cell is trained and scored on the
  same input width.
* ``project_out`` maps the active width to the teacher's output channels: a
  :class:`~lightning_nas.nn.elastic.DynamicConv2d` whose input channels follow the tensor, so a
  sub-stage of width ``w`` reads the first ``w`` input columns of one shared weight.

The loss is the normalised squared error ``||s - t||^2 / ||t - mean(t)||^2`` per batch, divided by
the *teacher's* spread (the reference divides by the student's, which a student can inflate to
lower its loss). Every step runs the sandwich rule: the cell's largest and smallest sub-stage
and ``random_substages`` random ones of :func:`~lightning_nas.spaces.spaceevo_layout.substage_choices`
(all widths of the stage, so every window); drawn from a generator seeded by the step, so a
resumed run draws what an uninterrupted one would. With ``quantize`` the stage's convolutions
carry the project's fake quantizers on the deployment grid (8-bit per-channel symmetric weights,
8-bit PACT activations); the projections stay in float (they are not part of a deployed network).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..errors import RecipeError
from ..nn.elastic import DynamicConv2d
from ..nn.quantize_model import attach_quantizers, calibrate_activation_ranges
from ..nn.spaceevo_blocks import ElasticStage
from ..spaces.spaceevo_layout import CIFAR_LAYOUT, MacroLayout, SubStage, substage_choices
from .optim import build_optimizer, warmup_cosine

__all__ = [
    "BlockDistillTask",
    "OFAStages",
    "StageStudent",
    "normalized_squared_error",
    "sample_substages",
    "stage_io",
    "teacher_from_supernet_checkpoint",
]

_EPS = 1e-12


def normalized_squared_error(student: Tensor, teacher: Tensor) -> Tensor:
    """``||student - teacher||^2 / ||teacher - mean(teacher)||^2`` over the whole batch tensor."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    teacher = teacher.detach()
    spread = (teacher - teacher.mean()).pow(2).sum().clamp_min(_EPS)
    return (student - teacher).pow(2).sum() / spread


class OFAStages(nn.Module):
    """``forward_stages`` of an extracted once-for-all MobileNetV3 subnet: the output of the
    fixed first block (stage 0's input) followed by every elastic stage's output."""

    def __init__(self, subnet: nn.Module) -> None:
        super().__init__()
        self.subnet = subnet
        space = subnet.space
        self.stage_blocks = [[str(b) for b in space.stage_blocks(s) if str(b) in subnet.blocks]
                             for s in range(space.num_stages)]
        self.stage_strides = list(space.stage_strides)

    def forward_stages(self, x: Tensor, last: int | None = None) -> list[Tensor]:
        """Stage inputs/outputs up to stage ``last``'s output (all stages when ``None``)."""
        outputs = [self.subnet.first_block(self.subnet.stem(x))]
        for s, names in enumerate(self.stage_blocks):
            if last is not None and s > last:
                break
            y = outputs[-1]
            for name in names:
                y = self.subnet.blocks[name](y)
            outputs.append(y)
        return outputs


def stage_io(teacher: nn.Module, images: Tensor, stage: int) -> tuple[Tensor, Tensor]:
    """The teacher's input and output of ``stage`` for ``images`` (no gradients)."""
    with torch.no_grad():
        if isinstance(teacher, OFAStages):
            outputs = teacher.forward_stages(images, last=stage)
        else:
            outputs = teacher.forward_stages(images)
    return outputs[stage], outputs[stage + 1]


def teacher_from_supernet_checkpoint(path: str, key: str = "distill.teacher") -> OFAStages:
    """The largest subnet of a once-for-all supernet checkpoint (``lightning-nas fit`` of a
    supernet recipe), frozen, in eval mode."""
    from .supernet import SupernetTask

    task = SupernetTask.from_checkpoint_file(path, key)
    space = task.space
    if not hasattr(space, "stage_blocks"):
        raise RecipeError("the teacher must be a once-for-all MobileNetV3 supernet", key=key, given=path,
                          allowed="a checkpoint of a supernet recipe on ofa_mbv3 / ofa_mbv3_cifar")
    teacher = OFAStages(task.supernet.extract(space.largest()))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def stage_input_width(layout: MacroLayout, stage: int) -> int:
    """The largest input width of a stage: the stem's channels, else the previous stage's largest width."""
    return layout.stem.channels if stage == 0 else max(layout.stages[stage - 1].widths)


class StageStudent(nn.Module):
    """1x1 projection in -> elastic stage -> elastic 1x1 projection out (see the module doc)."""

    def __init__(self, block_type: str, stage: int, teacher_in: int, teacher_out: int,
                 layout: MacroLayout = CIFAR_LAYOUT) -> None:
        super().__init__()
        spec = layout.stages[stage]
        self.in_width = stage_input_width(layout, stage)
        self.project_in = nn.Conv2d(teacher_in, self.in_width, 1)
        self.stage = ElasticStage(block_type, self.in_width, spec.widths, spec.stride)
        self.project_out = DynamicConv2d(max(spec.widths), teacher_out, 1, bias=True)

    def set_active(self, substage: SubStage) -> None:
        self.stage.set_active(substage, self.in_width)

    def forward(self, x: Tensor) -> Tensor:
        return self.project_out(self.stage(self.project_in(x)))


def sample_substages(stage: int, block_type: str, count: int, seed: int,
                     layout: MacroLayout = CIFAR_LAYOUT) -> list[SubStage]:
    """``count`` distinct sub-stages of the cell, seeded, spread evenly over the stage's widths
    (round robin over widths, random within a width): every width, hence every window, is
    scored. All of them when ``count`` is at least their number."""
    choices = substage_choices(stage, block_type, None, layout)
    if count >= len(choices):
        return choices
    rng = random.Random(f"{seed}:{stage}:{block_type}")
    by_width: dict[int, list[SubStage]] = {}
    for sub in choices:
        by_width.setdefault(sub.width, []).append(sub)
    for group in by_width.values():
        rng.shuffle(group)
    picked: list[SubStage] = []
    while len(picked) < count:
        for group in by_width.values():
            if group and len(picked) < count:
                picked.append(group.pop())
    return picked


def _stage_layers(stage: nn.Module) -> list[str]:
    return [name for name, m in stage.named_modules()
            if hasattr(m, "weight_quantizer") and hasattr(m, "input_quantizer")]


class BlockDistillTask(pl.LightningModule):
    """Sandwich-rule block-wise distillation of one cell (see the module doc).

    Args:
        teacher: a frozen network with ``forward_stages`` (kept out of the state dict).
        stage / block_type: the cell.
        resolution: image size of the probe that reads the teacher's channels.
        random_substages: random sub-stages per step besides the largest and the smallest.
        quantize: fake-quantize the stage (int8 QAT); call :meth:`calibrate` before training.
        reduce_weight_range: 7-bit weight codes (targets without VNNI).
    """

    def __init__(
        self,
        teacher: nn.Module,
        stage: int,
        block_type: str,
        layout: MacroLayout = CIFAR_LAYOUT,
        resolution: int = 32,
        random_substages: int = 2,
        lr: float = 1e-3,
        optimizer: Literal["sgd", "adam", "adamw"] = "adam",
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        sample_seed: int = 0,
        quantize: bool = False,
        reduce_weight_range: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "layout"])
        self._teacher = [teacher.eval()]  # a list keeps it out of the state dict and of the optimizer
        self.layout = layout
        self.stage_index = stage
        self.block_type = block_type
        probe = torch.zeros(2, layout.in_channels, resolution, resolution)
        t_in, t_out = stage_io(teacher, probe, stage)
        self.student = StageStudent(block_type, stage, t_in.shape[1], t_out.shape[1], layout)
        self.student.eval()
        out = self.student(t_in)
        if out.shape[2:] != t_out.shape[2:]:
            raise RecipeError(f"the teacher's stage {stage} maps {tuple(t_in.shape[2:])} to {tuple(t_out.shape[2:])} "
                              f"pixels, the layout's stage to {tuple(out.shape[2:])}: their strides differ",
                              key="distill.teacher", allowed=f"a teacher with stage strides "
                              f"{[s.stride for s in layout.stages]}")
        self.student.train()
        self.choices = substage_choices(stage, block_type, None, layout)
        self.automatic_optimization = False
        if quantize:
            self.enable_int8(reduce_weight_range)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def enable_int8(self, reduce_weight_range: bool = False) -> None:
        """8-bit weight (per channel, symmetric) and input quantizers on every conv of the stage."""
        names = _stage_layers(self.student.stage)
        attach_quantizers(self.student.stage, {n: (8, 8) for n in names}, reduce_weight_range=reduce_weight_range)

    def calibrate(self, images: Iterable[Tensor]) -> None:
        """Activation ranges of the stage's quantizers from the teacher's stage inputs of ``images``
        on the largest sub-stage (which runs every layer)."""
        self.student.set_active(self.student.stage.largest())
        inputs = [stage_io(self.teacher, x.to(self.device), self.stage_index)[0] for x in images]
        calibrate_activation_ranges(self.student, inputs)

    def step_substages(self, step: int) -> list[SubStage]:
        """The sandwich of a step: largest, smallest, then random sub-stages seeded by the step."""
        rng = random.Random(f"{self.hparams.sample_seed}:{self.stage_index}:{self.block_type}:{step}")
        stage = self.student.stage
        return [stage.largest(), stage.smallest(),
                *(rng.choice(self.choices) for _ in range(self.hparams.random_substages))]

    def on_fit_start(self) -> None:
        self._teacher[0] = self.teacher.to(self.device).eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        t_in, t_out = stage_io(self.teacher, images, self.stage_index)
        substages = self.step_substages(self.global_step)
        optimizer.zero_grad()
        total = torch.zeros((), device=images.device)
        for sub in substages:
            self.student.set_active(sub)
            loss = normalized_squared_error(self.student(t_in), t_out)
            self.manual_backward(loss / len(substages))
            total = total + loss.detach()
        optimizer.step()
        scheduler.step()
        mean = total / len(substages)
        self.log("train/loss", mean, prog_bar=True, on_step=True, on_epoch=True)
        return mean

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() > 1 and "alpha" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.dim() > 1 and "alpha" not in n)]
        optimizer = build_optimizer([{"params": decay, "weight_decay": hp.weight_decay},
                                     {"params": rest, "weight_decay": 0.0}], hp.optimizer, hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def substage_losses(self, substages: Sequence[SubStage], features: Sequence[tuple[Tensor, Tensor]],
                        bn_inputs: Sequence[Tensor] = (), progress: Any = None) -> list[float]:
        """Mean per-batch normalised loss of every sub-stage on teacher ``features`` (stage
        input, output), in eval mode. With ``bn_inputs`` (teacher stage inputs of training
        images) each sub-stage's batch norms are re-estimated first, as for any elastic subnet."""
        from ..nn.bn_recalibration import recalibrate_batchnorm

        losses = []
        was_training = self.student.training
        for sub in substages:
            self.student.set_active(sub)
            if bn_inputs:
                recalibrate_batchnorm(self.student, bn_inputs)
            self.student.eval()
            values = [float(normalized_squared_error(self.student(t_in), t_out)) for t_in, t_out in features]
            losses.append(sum(values) / len(values))
            if progress is not None:
                progress()
        self.student.train(was_training)
        return losses
