"""Quantization-aware finetuning (QAT) of one subnet under an APQ policy, trained for int8 deployment.

The subnet comes from a trained supernet (a checkpoint of ``lightning-nas fit`` with a supernet
recipe, plus a reference-subnet name or a config) or from an exported ``subnet.pt``. Its layers get
fake quantizers with the bits the policy gives them (:mod:`lightning_nas.spaces.quant_policy`)
when the task is built, so that the learned clipping values are parameters before the optimizer
exists. When fit starts, on the data module's held-out slice: batch-norm statistics are
recalibrated in full precision, activation ranges are calibrated, and batch norm is recalibrated
once more with quantization on (the statistics the quantized network will be evaluated with).
Training is plain cross-entropy (optionally distilled from the float subnet) with a cosine
learning rate; batch-norm statistics are frozen for the last ``freeze_bn_fraction`` of the steps.

When fit ends, the fake-quantized model is evaluated on the test split and written with the run's
figures to ``qat_metrics.json``, and its weights with quantizers to ``qat_subnet.pt``
(:func:`load_qat_subnet`). Deployment is a stage of its own: ``lightning-nas deploy``
(:mod:`lightning_nas.stages.deploy`) reads ``qat_subnet.pt`` from the run directory, converts it to
real int8 kernels and to ONNX (QDQ), and measures their top-1 agreement with the fake-quantized
model and their latency. With ``deploy`` (uniform 8-bit policies only) the subnet is trained for
that conversion.

Every accuracy here is top-1 in percent: the logged ``train/acc`` (the batch), ``val/acc`` (the
validation set) and ``test/top1``, and the ``*_top1`` figures.

Deployment-faithful QAT: int8 kernels also round tensors that input quantizers never see (a conv
output before h-swish, the operands and result of a residual add, the squeeze-excite input and
gate, the logits). With ``fake_quantize_outputs`` (on by default when deploying) those tensors get
8-bit output quantizers during training too (:func:`int8_rounding_points`), and conversion carries
their learned ranges over, so the deployed model computes what was trained.

Why one module of about 630 lines: the LightningModule (about 350 lines) and the helpers that
resolve its source subnet, its policy and its rounding points are one job, the QAT recipe; the
deployment that used to live here is the ``deploy`` stage.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nas.nn.builders import build_subnet

from ..errors import RecipeError
from ..files import replacing, write_text
from ..nn.bn_recalibration import recalibrate_batchnorm
from ..nn.evaluation import evaluate
from ..nn.metrics import PercentAccuracy, percent_accuracy
from ..nn.quant import ActivationQuantizer
from ..nn.quantize_model import (
    attach_bias_grids,
    attach_output_quantizers,
    attach_quantizers,
    calibrate_activation_ranges,
    freeze_batchnorm,
    get_bits,
    has_bias_grids,
    output_quantizers,
    quantized_layers,
    remove_quantizers,
)
from ..nn.safe_load import load_torch_file, require_mapping
from ..nn.shrinking import soft_cross_entropy
from ..recipe.markers import (
    BitChoices,
    ExistingFile,
    FixedBits,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from ..spaces.quant_policy import QuantPolicySpace
from ..targets import TargetName, check_same_target, resolve_target
from .optim import build_optimizer, parameter_groups, step_scheduler
from .supernet import holdout_batches

QAT_METRICS_FILE = "qat_metrics.json"
QAT_SUBNET_FILE = "qat_subnet.pt"


# --- what int8 kernels round ----------------------------------------------------------------------
def int8_rounding_points(
    model: nn.Module, backend: str = "onednn"
) -> tuple[list[str], dict[str, tuple[float, bool]]]:
    """Modules of an extracted MobileNetV3 subnet whose outputs int8 kernels round but no input
    quantizer covers, and the fixed ranges among them: ``(names, {name: (alpha, signed)})``.

    Derived from how FX int8 conversion quantizes this graph (every tensor between quantized ops
    is int8; a tensor read by a single quantized layer takes that layer's learned input range):

    * a conv (+ BN) output followed by h-swish (FX fuses conv-BN-ReLU, not h-swish);
    * the input of a residual block, read by its first layer and by the add (the producing module's
      output), and the project output that is the add's other operand;
    * in a squeeze-excite block, the depthwise output (read by the pool and the multiply), the SE
      expand conv output and the hard-sigmoid gate (fixed int8 grid of 1/256);
    * the head's h-swish output that is pooled, and the logits.

    A block output read only by the next block's first layer is not listed: that layer's input
    quantizer already is its int8 range. Conversion with all of them leaves no int8 tensor to
    calibration (``calibrated_tensors == 0`` up to the network output).
    """
    from ..deploy.int8 import fixed_output_range
    from ..nn.static import MBConv, MobileNetV3Subnet

    if not isinstance(model, MobileNetV3Subnet):
        raise TypeError(
            f"int8_rounding_points knows the MobileNetV3Subnet layout, got {type(model).__name__}"
        )
    points: list[str] = []
    fixed: dict[str, tuple[float, bool]] = {}

    def conv_bn_act(prefix: str, module: nn.Module) -> None:
        if isinstance(module.act, nn.Hardswish):
            points.append(f"{prefix}.bn" if module.bn is not None else f"{prefix}.conv")

    conv_bn_act("stem", model.stem)
    producer = "stem"
    blocks: list[tuple[str, MBConv]] = [("first_block", model.first_block)]
    blocks += [(f"blocks.{key}", block) for key, block in model.blocks.items()]
    for name, block in blocks:
        if block.residual:
            points.append(producer)
        if block.expand is not None:
            conv_bn_act(f"{name}.expand", block.expand)
        conv_bn_act(f"{name}.dw", block.dw)
        if block.se is not None:
            points += [f"{name}.dw", f"{name}.se.expand", f"{name}.se.gate"]
            gate_range = fixed_output_range(block.se.gate, backend)
            if gate_range is None:
                raise RuntimeError(
                    f"int8 conversion no longer gives {type(block.se.gate).__name__} fixed qparams"
                )
            fixed[f"{name}.se.gate"] = gate_range
        if block.residual:
            points.append(f"{name}.project")
        producer = name
    conv_bn_act("head.final_expand", model.head.final_expand)
    points.append("head.final_expand")  # pooled: the pool reads an int8 tensor with its own range
    conv_bn_act("head.feature_mix", model.head.feature_mix)
    points.append("classifier.linear")
    return list(dict.fromkeys(points)), fixed


# --- sources and policies -------------------------------------------------------------------------
def resolve_policy(
    policy: int | Mapping[str, Any] | str, policy_space: QuantPolicySpace, num_blocks: int, seed: int = 0
) -> dict[str, list[int]]:
    """A validated APQ policy from a uniform bit width, an explicit policy or ``"random"``."""
    if isinstance(policy, bool):
        raise RecipeError(f"policy must be a bit width, a policy mapping or 'random', got {policy!r}", key="task.policy")
    if isinstance(policy, int):
        try:
            return policy_space.uniform(policy, num_blocks)
        except ValueError as error:  # the policy space's check of the user's bit width
            raise RecipeError(str(error), key="task.policy", given=policy) from None
    if isinstance(policy, str):
        if policy != "random":
            raise RecipeError(
                f"policy must be a bit width (e.g. 8), a mapping {{pw_w, pw_a, dw_w, dw_a}} or "
                f"'random', got {policy!r}", key="task.policy"
            )
        return policy_space.sample(random.Random(seed), num_blocks)
    try:
        return policy_space.validate(policy, num_blocks)
    except ValueError as error:  # the policy space's check of the user's policy mapping
        raise RecipeError(str(error), key="task.policy", given=dict(policy)) from None


def _searched_candidate(path: str, index: int, subnet: object, policy: object) -> tuple[dict, object]:
    """(architecture, policy) of row ``index`` of a search's topk.json; policy stays unless it is 'candidate'."""
    if subnet is not None:
        raise RecipeError("give either subnet or candidate (a search's topk.json), not both", key="task.candidate")
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["topk"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f"candidate {path} is not a topk.json of `lightning-nas search`", key="task.candidate") from None
    if not 0 <= index < len(rows):
        raise RecipeError(f"candidate_index {index} is out of range: {path} has {len(rows)} candidates", key="task.candidate_index")
    row = rows[index]
    return dict(row["config"]), (dict(row["policy"]) if policy == "candidate" else policy)


def _candidate_target(path: str) -> str | None:
    """The deployment target a search's topk.json was found for (``None`` before targets)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("target")
    except (json.JSONDecodeError, AttributeError):
        return None


def _load_supernet_source(
    checkpoint: str, subnet: str | Mapping[str, Any]
) -> tuple[Any, dict, dict, nn.Module]:
    from .supernet import SupernetTask

    task = SupernetTask.from_checkpoint_file(checkpoint, "task.supernet_checkpoint")
    if isinstance(subnet, str):
        if subnet not in task.reference_subnets:
            raise RecipeError("unknown reference subnet", key="task.subnet", given=subnet,
                              allowed=f"{', '.join(sorted(task.reference_subnets))} (or a config {{ks, e, d, r}})")
        config = dict(task.reference_subnets[subnet])
    else:
        try:
            config = task.space.canonical(task.space.validate(dict(subnet)))
        except ValueError as error:  # the space's own check of a user-given config
            raise RecipeError(str(error), key="task.subnet", given=dict(subnet)) from None
    model = task.supernet.extract(config)
    return task.space, dict(task.hparams.space), config, model


def _load_exported_source(path: str) -> tuple[Any, dict, dict, nn.Module]:
    from .supernet import SUBNET_FILE_DESCRIPTION, rebuild_network

    saved = load_torch_file(path, key="task.exported_subnet", what=SUBNET_FILE_DESCRIPTION)
    model, space_spec, config = rebuild_network(saved, path=path, key="task.exported_subnet")
    from ..registry import SPACES

    return SPACES.build(space_spec), space_spec, config, model


# --- the task -------------------------------------------------------------------------------------
class QATTask(pl.LightningModule):
    """Quantization-aware finetuning of one subnet under a quantization policy, for int8 deployment.

    Args:
        supernet_checkpoint: a supernet checkpoint (``lightning-nas fit`` of a supernet recipe);
            needs ``subnet``.
        subnet: with ``supernet_checkpoint``: a reference subnet's name (smallest, largest,
            random0, ...) or a config ``{ks, e, d, r}``.
        exported_subnet: instead, a ``subnet.pt`` written by ``lightning-nas export``.
        policy: a uniform bit width (one of ``bit_choices``), an APQ policy
            ``{pw_w, pw_a, dw_w, dw_a}`` with one entry per block slot, or ``"random"``.
        policy_seed: seed of the ``"random"`` policy.
        bit_choices / fixed_bits: the policy space (fixed bits: stem, first block, SE, head,
            classifier).
        lr, optimizer, momentum, weight_decay, label_smoothing: cosine-annealed finetuning (APQ:
            lr 1e-3); no weight decay on batch norm, biases and clipping values.
        kd_ratio: weight of distillation from the float subnet (0: none).
        freeze_bn_fraction: batch-norm statistics are frozen for this last share of the training
            steps (0: never, 1: from the first step).
        recalibrate_bn: recompute batch-norm statistics on the held-out slice before training.
        bn_recalibration_images, calibration_batch, calibration_percentile: held-out images for
            BN recalibration and activation-range calibration, their batch size and the
            percentile of magnitudes a clipping value starts from.
        test_images: test images for the top-1 figures, a seeded sample stratified by class
            (``None``: all).
        deploy: train for int8 deployment by ``lightning-nas deploy``; needs a uniform 8-bit policy
            (every layer at 8/8 bits, or full precision).
        fake_quantize_outputs: with ``deploy``, also fake-quantize what int8 kernels round
            (:func:`int8_rounding_points`) during training.
        target: the deployment target (:mod:`lightning_nas.targets`; ``auto``: this host's CPU kind,
            torch runtime). It fixes the weight grid trained here (7-bit weights without VNNI), the
            conversion engine, and which runtime's int8 model is the deployed one.
        allow_mixed_targets: accept a search ``candidate`` found for another target.
        int8_backend: override the quantized engine the target implies (``onednn`` on x86,
            ``qnnpack`` on ARM); fbgemm's depthwise kernels (picked by ``x86``) saturate even
            with VNNI (see :mod:`lightning_nas.deploy.int8`). Recorded in ``qat_subnet.pt``: the
            deploy stage converts with it.
    """

    def __init__(
        self,
        supernet_checkpoint: ExistingFile | None = None,
        subnet: str | dict[str, Any] | None = None,
        exported_subnet: ExistingFile | None = None,
        candidate: ExistingFile | None = None,
        candidate_index: NonNegativeInt = 0,
        policy: int | dict[str, Any] | Literal["random", "candidate"] = 8,
        policy_seed: int = 0,
        bit_choices: BitChoices = [4, 6, 8],  # noqa: B006 - copied by QuantPolicySpace
        fixed_bits: FixedBits = 8,
        lr: PositiveFloat = 1e-3,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: NonNegativeFloat = 0.9,
        weight_decay: NonNegativeFloat = 1e-5,
        label_smoothing: Fraction = 0.0,
        kd_ratio: NonNegativeFloat = 0.0,
        freeze_bn_fraction: Fraction = 0.3,
        recalibrate_bn: bool = True,
        bn_recalibration_images: PositiveInt = 2000,
        calibration_batch: PositiveInt = 200,
        calibration_percentile: PositiveFloat = 99.99,
        test_images: PositiveInt | None = None,
        deploy: bool = True,
        fake_quantize_outputs: bool = True,
        target: TargetName = "auto",
        allow_mixed_targets: bool = False,
        int8_backend: Literal["onednn", "x86", "fbgemm", "qnnpack"] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= freeze_bn_fraction <= 1.0:
            raise RecipeError(f"freeze_bn_fraction must be in [0, 1], got {freeze_bn_fraction}", key="task.freeze_bn_fraction")
        if bn_recalibration_images < 1:
            raise RecipeError("bn_recalibration_images must be positive", key="task.bn_recalibration_images")
        self.target = resolve_target(target, key="task.target")
        self.hparams.target = self.target.name  # the resolved target, not "auto", goes into checkpoints
        if candidate:
            check_same_target(
                {f"candidate {candidate}": _candidate_target(candidate)}, self.target.name, allow_mixed_targets,
                key="task.target",
            )
            subnet, policy = _searched_candidate(candidate, candidate_index, subnet, policy)
        elif policy == "candidate":
            raise RecipeError("policy: candidate takes the policy of a search result; set candidate: to its topk.json", key="task.policy")
        sources = [
            name
            for name, value in (
                ("supernet_checkpoint", supernet_checkpoint),
                ("exported_subnet", exported_subnet),
            )
            if value
        ]
        if len(sources) != 1:
            raise RecipeError(
                "QAT needs exactly one source: supernet_checkpoint (with subnet) or exported_subnet; "
                + (f"got both {sources}" if sources else "got neither"), key="task"
            )
        if supernet_checkpoint:
            if subnet is None:
                raise RecipeError(
                    "supernet_checkpoint needs subnet: a reference subnet name (smallest, largest, "
                    "random0, ...) or a config {ks, e, d, r}", key="task.subnet"
                )
            self.space, self.space_spec, self.config, model = _load_supernet_source(
                supernet_checkpoint, subnet
            )
        else:
            if subnet is not None:
                raise RecipeError(
                    "subnet goes with supernet_checkpoint; an exported_subnet already fixes the architecture", key="task.subnet"
                )
            self.space, self.space_spec, self.config, model = _load_exported_source(exported_subnet)
        self.resolution = int(self.config["r"])

        try:  # the policy space's own checks of exactly the user's settings
            self.policy_space = QuantPolicySpace(bit_choices, fixed_bits)
        except ValueError as error:
            raise RecipeError(str(error), key="task.bit_choices", given=list(bit_choices)) from None
        self.policy = resolve_policy(policy, self.policy_space, self.space.num_blocks, policy_seed)
        self.layer_specs = self.space.layer_specs(self.config)
        self.bits_by_layer = self.policy_space.bits_for_layers(self.layer_specs, self.policy)
        if deploy:
            not_int8 = {n: b for n, b in self.bits_by_layer.items() if b not in ((8, 8), (32, 32))}
            if not_int8:
                name, bits = next(iter(not_int8.items()))
                raise RecipeError(
                    f"deploy converts to real int8 kernels and needs a uniform 8-bit policy (policy: 8); "
                    f"this policy gives {len(not_int8)} layer(s) other bits, e.g. '{name}' {bits}. "
                    "Set deploy: false to finetune a mixed-precision policy.", key="task.policy"
                )
        self.model = model
        self.val_top1 = PercentAccuracy(self.space.num_classes)
        attach_quantizers(self.model, self.bits_by_layer, reduce_weight_range=self.target.reduced_weights)
        self.output_points: list[str] = []
        self.fixed_ranges: dict[str, tuple[float, bool]] = {}
        if deploy and fake_quantize_outputs:
            self.output_points, self.fixed_ranges = int8_rounding_points(
                self.model, int8_backend or self.target.engine
            )
            attach_output_quantizers(self.model, self.output_points, bits=8, fixed_ranges=self.fixed_ranges)
        if deploy and self.target.runtime == "onnxruntime":
            # ONNX Runtime adds conv/linear biases as int32 codes of step s_in * s_w
            attach_bias_grids(self.model)
        self._teacher: list[nn.Module] = []  # a list keeps it out of the state dict
        self._bn_frozen_at: int | None = None
        self._bn_frozen_here = False  # whether this process has frozen batch norm (a resumed one must again)
        self.figures: dict[str, Any] = {}
        self._seed = torch.initial_seed()  # the run's seed (set before the task is built)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    # --- data helpers -------------------------------------------------------------------------
    def _at_resolution(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.resolution:
            return images
        return F.interpolate(
            images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
        )

    def _holdout(self) -> list[torch.Tensor]:
        datamodule = self.trainer.datamodule
        batches = holdout_batches(
            datamodule, self.hparams.bn_recalibration_images, self.hparams.calibration_batch
        )
        return [datamodule.normalize(b.to(self.device), self.resolution) for b in batches]

    def _test_batches(
        self, limit: int | None, device: torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised test batches (the data module's test split), at most ``limit`` images: the
        split is kept in stratified seeded order (:func:`~lightning_nas.data.subsets.evaluation_subset`),
        so its first ``limit`` images are a sample over every class, not the front of the file."""
        datamodule = self.trainer.datamodule
        device = device or self.device
        seen = 0
        for images, labels in datamodule.test_dataloader():
            if limit is not None:
                if seen >= limit:
                    return
                images, labels = images[: limit - seen], labels[: limit - seen]
            seen += len(labels)
            yield datamodule.normalize(images.to(device), self.resolution), labels.to(device)

    def _test_top1(self, model: nn.Module) -> float:
        modes = {m: m.training for m in model.modules()}
        try:
            return evaluate(model, self._test_batches(self.hparams.test_images))[0]
        finally:
            for module, mode in modes.items():
                module.training = mode

    # --- before training: BN recalibration and range calibration -----------------------------
    def on_fit_start(self) -> None:
        quantizers = [aq for _, aq in quantized_layers(self.model).values()] + list(
            output_quantizers(self.model).values()
        )
        if all(bool(q.initialized) for q in quantizers):
            return  # resumed from a checkpoint: ranges and statistics are in the state dict
        holdout = self._holdout()
        if self.hparams.recalibrate_bn:
            with quantization_disabled(self.model):
                recalibrate_batchnorm(self.model, holdout)
        with quantization_disabled(self.model):
            self.figures["fp32_top1"] = self._test_top1(self.model)
            if self.hparams.kd_ratio > 0:
                teacher = copy.deepcopy(self.model)
                remove_quantizers(teacher)
                self._teacher = [teacher.eval().requires_grad_(False)]
        calibrate_activation_ranges(self.model, holdout, percentile=self.hparams.calibration_percentile)
        if self.hparams.recalibrate_bn:
            # The statistics the quantized network is evaluated with: its own, not the float one's.
            recalibrate_batchnorm(self.model, holdout)
        self.figures["initial_top1"] = self._test_top1(self.model)
        if self.trainer.is_global_zero:
            print(
                f"QAT start: fp32 top-1 {self.figures['fp32_top1']:.2f}%, quantized before finetuning "
                f"{self.figures['initial_top1']:.2f}% ({describe_policy(self.policy)})"
            )

    # --- training -----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        fraction = self.hparams.freeze_bn_fraction
        if self._bn_frozen_at is not None and not self._bn_frozen_here:  # resumed after the freeze
            freeze_batchnorm(self.model)
            self._bn_frozen_here = True
        if self._bn_frozen_at is not None or fraction <= 0:
            return
        total = self.trainer.estimated_stepping_batches
        if math.isfinite(total) and self.global_step >= (1.0 - fraction) * total:
            freeze_batchnorm(self.model)
            self._bn_frozen_at = int(self.global_step)
            self._bn_frozen_here = True

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        # Dropout masks as a function of the step: a resumed run repeats the uninterrupted one.
        torch.manual_seed(self._seed * 1_000_003 + self.global_step)
        images = self._at_resolution(images)
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        if self._teacher:
            with torch.no_grad():
                target = F.softmax(self._teacher[0].to(images.device)(images), dim=1)
            loss = loss + self.hparams.kd_ratio * soft_cross_entropy(logits, target)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", percent_accuracy(logits, labels), prog_bar=True)
        self.log("train/bn_frozen", float(self._bn_frozen_at is not None))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self.model(self._at_resolution(images))
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_top1.update(logits, labels)
        self.log("val/acc", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay)
        # PACT clipping values must not decay towards zero: they would clip ever more.
        alphas = {id(m.alpha) for m in self.model.modules() if isinstance(m, ActivationQuantizer)}
        groups = [
            {
                "params": [p for p in groups[0]["params"] if id(p) not in alphas],
                "weight_decay": hp.weight_decay,
            },
            {
                "params": groups[1]["params"] + [p for p in groups[0]["params"] if id(p) in alphas],
                "weight_decay": 0.0,
            },
        ]
        optimizer = build_optimizer(groups, hp.optimizer, hp.lr, hp.momentum)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 1
        return {"optimizer": optimizer, "lr_scheduler": step_scheduler(optimizer, "cosine", max(1, total))}

    # --- checkpoints: what a resumed run needs besides the weights ----------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qat"] = {"figures": dict(self.figures), "bn_frozen_at": self._bn_frozen_at,
                             "teacher": self._teacher[0].state_dict() if self._teacher else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("qat") or {}
        self.figures.update(saved.get("figures") or {})
        self._bn_frozen_at = saved.get("bn_frozen_at")
        if saved.get("teacher") is not None:
            teacher = copy.deepcopy(self.model)
            remove_quantizers(teacher)
            teacher.load_state_dict(saved["teacher"])
            self._teacher = [teacher.eval().requires_grad_(False)]

    # --- after training: test, save (``lightning-nas deploy`` deploys the saved subnet) --------
    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        run_dir = Path(self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.figures["test_top1"] = self._test_top1(self.model)
        self.save_qat_subnet(run_dir / QAT_SUBNET_FILE)
        weight_bits, act_bits = self.policy_space.average_bits(self.policy, self.layer_specs)
        metrics = {
            "config": self.config,
            "space": self.space_spec,
            "source": self.hparams.supernet_checkpoint or self.hparams.exported_subnet,
            "policy": self.policy,
            "average_bits": {"weight": weight_bits, "activation": act_bits},
            "macs": self.space.macs(self.config),
            "params": self.space.params(self.config),
            "resolution": self.resolution,
            "fp32_top1": self.figures.get("fp32_top1"),
            "initial_top1": self.figures.get("initial_top1"),
            "test_top1": self.figures["test_top1"],
            "test_images": self._count_test_images(),
            "epochs": int(self.current_epoch),
            "steps": int(self.global_step),
            "bn_frozen_at_step": self._bn_frozen_at,
            "fake_quantized_outputs": len(self.output_points),
            "target": self.target.name,
        }
        write_text(run_dir / QAT_METRICS_FILE, json.dumps(metrics, indent=2))
        logged = {"test/top1": metrics["test_top1"]}
        for logger in self.trainer.loggers:
            logger.log_metrics(logged, step=self.global_step)
            logger.save()
        print(f"QAT done: test top-1 {metrics['test_top1']:.2f}% (fake-quantized) -> {run_dir / QAT_SUBNET_FILE}")

    def _count_test_images(self) -> int:
        total = len(self.trainer.datamodule.test_dataloader().dataset)
        return total if self.hparams.test_images is None else min(total, self.hparams.test_images)

    def save_qat_subnet(self, path: Path) -> None:
        """Weights with quantizers and everything :func:`load_qat_subnet` needs to rebuild them."""
        record = {
            "config": self.config,
            "space": self.space_spec,
            "policy": self.policy,
            "target": self.target.name,
            "int8_backend": self.hparams.int8_backend,
            "bits": {k: list(v) for k, v in get_bits(self.model).items()},
            "output_points": self.output_points,
            "fixed_ranges": self.fixed_ranges,
            "bias_grids": has_bias_grids(self.model),
            "state_dict": {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in self.model.state_dict().items()
            },
        }
        with replacing(path) as temporary:
            torch.save(record, temporary)


# --- helpers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in full precision inside the block; every quantizer's bits come back after."""
    layers = quantized_layers(model)
    outputs = output_quantizers(model)
    saved = (
        {name: (wq.bits, aq.bits) for name, (wq, aq) in layers.items()},
        {name: q.bits for name, q in outputs.items()},
    )
    try:
        for wq, aq in layers.values():
            wq.bits, aq.bits = None, None
        for q in outputs.values():
            q.bits = None
        yield model
    finally:
        for name, (wq, aq) in layers.items():
            wq.bits, aq.bits = saved[0][name]
        for name, q in outputs.items():
            q.bits = saved[1][name]


def describe_policy(policy: Mapping[str, list[int]]) -> str:
    values = {b for bits in policy.values() for b in bits}
    return f"uniform {values.pop()}-bit policy" if len(values) == 1 else "mixed-precision policy"


def load_qat_subnet(path: str | Path) -> nn.Module:
    """Rebuild a finetuned subnet with its quantizers from ``qat_subnet.pt`` (eval mode)."""
    from ..registry import SPACES

    saved = require_mapping(load_torch_file(path, key=None, what="a qat_subnet.pt of a QAT run"),
                            ("space", "config", "bits", "output_points", "fixed_ranges", "state_dict"),
                            path=path, key=None, what="a qat_subnet.pt of a QAT run")
    space = SPACES.build(saved["space"])
    model = build_subnet(space, saved["config"])
    # files from before deployment targets were trained on the full 8-bit weight grid
    reduced = resolve_target(saved["target"]).reduced_weights if saved.get("target") else False
    attach_quantizers(model, {name: tuple(bits) for name, bits in saved["bits"].items()}, reduce_weight_range=reduced)
    if saved["output_points"]:
        attach_output_quantizers(
            model,
            saved["output_points"],
            bits=8,
            fixed_ranges={k: tuple(v) for k, v in saved["fixed_ranges"].items()},
        )
    if saved.get("bias_grids", False):  # absent in files written before bias grids
        attach_bias_grids(model)
    model.load_state_dict(saved["state_dict"])
    return model.eval()
