"""ProxylessNAS: differentiable, memory-frugal architecture search on the target task and hardware.

The search loop (manual optimisation, two optimizers):

1. **Warm-up** (``warmup_epochs``): weight steps only, on uniformly random paths, with their own
   cosine schedule from ``warmup_lr``.
2. **Search**: every training batch is a weight step on one path per layer drawn from the
   architecture's probabilities (SGD, Nesterov, cosine from ``lr``); every ``arch_update_every``
   weight steps, ``arch_steps`` architecture steps on batches of the held-out split
   (``datamodule.holdout_dataloader()``): two paths per layer, binary gates, the two-path gradient
   estimate, Adam (lr 6e-3, betas (0, 0.999), eps 1e-8), then the rescaling that keeps the
   unsampled paths' probabilities (see :mod:`lightning_nas.nn.mixed_op`).

The architecture loss adds the expected cost ``E[cost] = fixed + sum_l sum_j p_lj cost_lj``:

* ``multiplicative``: ``CE * (log E[cost] / log target) ** beta`` (the paper's code: beta 0.3);
* ``additive``: ``CE + latency_lambda * (E[cost] - target) / target``;
* ``none``: cross-entropy only.

The per-(layer, candidate) cost vector is computed once, at setup, by ``cost``:

* ``latency``: this machine's measured latency in ms, from the project's latency table (JSON file
  ``cost_table``, default ``run_dir/latency_table.json``), timed inside profiling networks and
  resumable (:func:`lightning_nas.tasks.proxyless_costs.measured_latency_table`).
* ``flops``: millions of MACs, from the space's layer specs.
* ``accelerator``: latency in ms of the BitFusion-like analytic model
  (:class:`lightning_nas.hardware.accelerator.BitFusionModel`, arguments in ``accelerator``) at
  ``accelerator_bits`` for weights and activations.

Logged: ``train/loss``, ``train/acc`` (top-1 of the batch on the sampled paths, percent),
``arch/*``, and ``val/loss`` and ``val/acc`` (top-1 of the derived architecture over the validation
set, percent).

At the end of fit the derived architecture (most probable op per layer) is written to
``run_dir/derived_arch.json`` (ops, probabilities, expected and derived cost; the format of
:func:`lightning_nas.spaces.proxyless.derived_arch_record`) and the standalone network with the
search weights to ``run_dir/derived_model.pt``. Train it from scratch with
``recipes/proxylessnas_train.yaml``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nas.nn.builders import build_subnet, build_supernet

from ..errors import RecipeError
from ..files import append_line, replacing, write_text
from ..nn.metrics import PercentAccuracy, percent_accuracy
from ..recipe.markers import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, SpaceSpec
from ..spaces.proxyless import ZERO, ProxylessSpace, derived_arch_record
from .optim import warmup_cosine
from .proxyless_costs import CostTable, accelerator_table, flops_table, measured_latency_table

DERIVED_ARCH_FILE = "derived_arch.json"
DERIVED_MODEL_FILE = "derived_model.pt"
LATENCY_TABLE_FILE = "latency_table.json"
ARCH_HISTORY_FILE = "arch_history.jsonl"



# ---------------------------------------------------------------------------------------- the task

class ProxylessSearchTask(pl.LightningModule):
    """ProxylessNAS search over a registered ProxylessNAS space (see the module docstring).

    Args:
        space: the search space (``proxyless`` or ``proxyless_cifar``).
        mixed_op: ``binary`` (ProxylessNAS path binarisation) or ``all_paths`` (DARTS-style
            weighted sum of every path, first order; for comparison).
        lr: peak learning rate of the weight steps in the search phase (cosine per step).
        warmup_lr: peak learning rate of the warm-up phase (its own cosine); None: ``lr``.
        momentum / nesterov / weight_decay: the weight optimizer (SGD); no decay on BN and biases.
        label_smoothing: of the weight steps' cross-entropy (the architecture steps use plain CE).
        warmup_epochs: epochs of weight-only training on uniformly random paths before the search.
        arch_lr / arch_betas / arch_eps / arch_weight_decay: the architecture optimizer (Adam).
        arch_update_every: one round of architecture steps every this many weight steps.
        arch_steps: architecture steps per round.
        arch_batch_size: held-out batch size of an architecture step; None: the data's batch size.
        latency_loss: ``multiplicative``, ``additive`` or ``none``.
        target: the cost target in the cost's unit; None: ``target_ratio`` x the expected cost of
            the uniform architecture distribution (portable across machines).
        target_ratio: see ``target``.
        beta: exponent of the multiplicative form.
        latency_lambda: weight of the additive form.
        cost: ``latency`` (measured on this machine), ``flops`` or ``accelerator``.
        cost_scale: multiplies every cost (and is the unit of ``target``); the multiplicative form
            needs costs above 1 because it takes their logarithm.
        cost_table: the measured latency cache; None: ``run_dir/latency_table.json``.
        latency_batch_size / latency_threads / latency_warmup / latency_repeats: the measurement.
        latency_context: ``network`` (units timed inside profiling networks) or ``isolated``.
        latency_realtime: time under real-time priority (needs root; see the latency-table module).
        accelerator: arguments of the accelerator model; accelerator_bits: its weight/activation bits.
        sample_seed: seeds path sampling (by step, so every DDP rank draws the same paths).
    """

    def __init__(
        self,
        space: SpaceSpec,
        mixed_op: Literal["binary", "all_paths"] = "binary",
        lr: PositiveFloat = 0.025,
        warmup_lr: PositiveFloat | None = 0.05,
        momentum: NonNegativeFloat = 0.9,
        nesterov: bool = True,
        weight_decay: NonNegativeFloat = 4e-5,
        label_smoothing: Fraction = 0.1,
        warmup_epochs: NonNegativeInt = 40,
        arch_lr: PositiveFloat = 6e-3,
        arch_betas: list[float] = [0.0, 0.999],  # noqa: B006 - read only
        arch_eps: float = 1e-8,
        arch_weight_decay: float = 0.0,
        arch_update_every: PositiveInt = 5,
        arch_steps: NonNegativeInt = 1,
        arch_batch_size: PositiveInt | None = None,
        latency_loss: Literal["multiplicative", "additive", "none"] = "multiplicative",
        target: PositiveFloat | None = None,
        target_ratio: PositiveFloat = 0.8,
        beta: float = 0.3,
        latency_lambda: float = 0.1,
        cost: Literal["latency", "flops", "accelerator"] = "latency",
        cost_scale: PositiveFloat = 1.0,
        cost_table: str | None = None,
        latency_batch_size: PositiveInt = 1,
        latency_threads: PositiveInt = 1,
        latency_warmup: NonNegativeInt = 10,
        latency_repeats: PositiveInt = 30,
        latency_context: Literal["network", "isolated"] = "network",
        latency_realtime: bool = False,
        accelerator: dict[str, Any] | None = None,
        accelerator_bits: int = 8,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch_update_every < 1 or arch_steps < 0:
            raise ValueError(f"arch_update_every must be >= 1 and arch_steps >= 0, got {arch_update_every}, {arch_steps}")
        if len(arch_betas) != 2:
            raise RecipeError(f"arch_betas needs two values (beta1, beta2), got {arch_betas}", key="task.arch_betas")
        if latency_loss != "none" and target is not None and target <= 0:
            raise ValueError(f"target must be positive, got {target}")
        if not target_ratio > 0 or not cost_scale > 0:
            raise ValueError(f"target_ratio and cost_scale must be positive, got {target_ratio}, {cost_scale}")
        from ..registry import SPACES

        self.space: ProxylessSpace = SPACES.build(space)
        if not isinstance(self.space, ProxylessSpace):
            raise RecipeError(f"the proxyless task needs a ProxylessNAS space, got {type(self.space).__name__}", key="task.space")
        self.supernet = build_supernet(self.space, mixed_op)
        self.val_top1 = PercentAccuracy(self.space.num_classes)
        self.automatic_optimization = False
        self.ddp_find_unused_parameters = True  # one path per layer runs
        self.table: CostTable | None = None
        self.target: PositiveFloat | None = target
        self._costs: list[Tensor] = []
        self._holdout: Iterator | None = None

    # --- costs ----------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) if self._trainer is not None else Path(".")

    def build_cost_table(self) -> CostTable:
        hp = self.hparams
        if hp.cost == "flops":
            table = flops_table(self.space)
        elif hp.cost == "accelerator":
            table = accelerator_table(self.space, bits=hp.accelerator_bits, arguments=hp.accelerator)
        else:
            path = Path(hp.cost_table) if hp.cost_table else self.run_dir / LATENCY_TABLE_FILE
            table = measured_latency_table(self.space, path, batch_size=hp.latency_batch_size,
                                           threads=hp.latency_threads, warmup=hp.latency_warmup,
                                           repeats=hp.latency_repeats, context=hp.latency_context,
                                           realtime=hp.latency_realtime)
        return table.scaled(hp.cost_scale)

    def set_cost_table(self, table: CostTable) -> None:
        """Use ``table`` for the expected cost; fixes the target if none was given."""
        if len(table.costs) != self.space.num_layers:
            raise RecipeError(f"cost table has {len(table.costs)} layers, the space {self.space.num_layers}", key="task.cost_table")
        self.table = table
        self._costs = [torch.tensor(row, dtype=torch.float32) for row in table.costs]
        if self.hparams.target is None:
            uniform = [torch.full((len(row),), 1.0 / len(row)) for row in table.costs]
            self.target = self.hparams.target_ratio * (table.fixed + sum(float((p * c).sum())
                                                                       for p, c in zip(uniform, self._costs)))
        if self.hparams.latency_loss == "multiplicative" and self.target <= 1.0:
            raise RecipeError(f"the multiplicative latency loss takes log(cost): the target must exceed 1 in the "
                             f"cost's unit ({table.unit}), got {self.target:.4g}; raise cost_scale or use "
                             f"latency_loss=additive", key="task.target")

    def setup(self, stage: str) -> None:
        if self.table is not None:
            return
        if self.trainer.world_size > 1:
            # one rank measures (concurrent timing would disturb itself); the others read its cache
            if self.trainer.is_global_zero:
                self.set_cost_table(self.build_cost_table())
            self.trainer.strategy.barrier()
            if not self.trainer.is_global_zero:
                self.set_cost_table(self.build_cost_table())
        else:
            self.set_cost_table(self.build_cost_table())

    def expected_cost(self) -> Tensor:
        """``E[cost]`` under the current architecture probabilities (differentiable)."""
        if self.table is None:
            raise RuntimeError("no cost table yet: it is built in setup() (or call set_cost_table)")
        return self.supernet.expected_cost([c.to(self.device) for c in self._costs], self.table.fixed)

    def arch_loss(self, ce: Tensor, expected: Tensor) -> Tensor:
        """Cross-entropy combined with the expected cost (``latency_loss``)."""
        hp = self.hparams
        if hp.latency_loss == "none":
            return ce
        if hp.latency_loss == "multiplicative":
            return ce * (torch.log(expected) / math.log(self.target)) ** hp.beta
        return ce + hp.latency_lambda * (expected - self.target) / self.target

    # --- schedule -------------------------------------------------------------------------------
    def in_warmup(self) -> bool:
        return self.current_epoch < self.hparams.warmup_epochs

    def weight_step_index(self, batch_idx: int) -> int:
        return self.current_epoch * self._batches_per_epoch() + batch_idx

    def _batches_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches
        return max(1, int(batches)) if batches != float("inf") else 1

    def current_lr(self, batch_idx: int) -> float:
        hp = self.hparams
        per_epoch = self._batches_per_epoch()
        epochs = int(self.trainer.max_epochs or 1)
        if self.in_warmup():
            total, step, peak = hp.warmup_epochs * per_epoch, self.weight_step_index(batch_idx), hp.warmup_lr or hp.lr
        else:
            warm = min(hp.warmup_epochs, epochs)
            total = max(1, (epochs - warm) * per_epoch)
            step, peak = self.weight_step_index(batch_idx) - warm * per_epoch, hp.lr
        return peak * warmup_cosine(total)(step)

    def _generator(self, kind: str, step: int) -> torch.Generator:
        # arithmetic, not hash(): string hashes differ between processes, and every rank must agree
        stream = {"weight": 0, "arch": 1}[kind]
        return torch.Generator().manual_seed((self.hparams.sample_seed * 1_000_003 + step) * 2 + stream)

    # --- training -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.supernet.set_search_mode()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        weight_opt, arch_opt = self.optimizers()
        images, labels = batch
        step = self.weight_step_index(batch_idx)
        lr = self.current_lr(batch_idx)
        for group in weight_opt.param_groups:
            group["lr"] = lr
        binary = self.hparams.mixed_op == "binary"
        if binary:
            self.supernet.sample_paths(self._generator("weight", step), uniform=self.in_warmup())
        weight_opt.zero_grad(set_to_none=True)
        logits = self.supernet(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.manual_backward(loss)
        weight_opt.step()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", percent_accuracy(logits, labels), prog_bar=True)
        self.log("train/lr", lr)
        if not self.in_warmup() and (step + 1) % self.hparams.arch_update_every == 0:
            for k in range(self.hparams.arch_steps):
                self.architecture_step(arch_opt, step * max(1, self.hparams.arch_steps) + k)
        return loss

    def next_holdout_batch(self) -> tuple[Tensor, Tensor]:
        """The next held-out batch (cycling), normalised like training batches."""
        datamodule = self.trainer.datamodule
        if self._holdout is None:
            if getattr(datamodule, "holdout_set", None) is None or len(datamodule.holdout_set) == 0:
                raise RecipeError("ProxylessNAS architecture steps need held-out images: set data.holdout_size > 0", key="data.holdout_size")
            self._holdout_loader = datamodule.holdout_dataloader(
                batch_size=self.hparams.arch_batch_size or datamodule.batch_size)
            self._holdout = iter(self._holdout_loader)
        try:
            images, labels = next(self._holdout)
        except StopIteration:
            self._holdout = iter(self._holdout_loader)
            images, labels = next(self._holdout)
        images = datamodule.normalize(images.to(self.device), self.space.resolution)
        return images, labels.to(self.device)

    def architecture_step(self, arch_opt: Any, step: int) -> dict[str, float]:
        """One architecture update on a held-out batch; returns the logged values."""
        images, labels = self.next_holdout_batch()
        binary = self.hparams.mixed_op == "binary"
        if binary:
            self.supernet.sample_pairs(self._generator("arch", step))
        arch_opt.zero_grad(set_to_none=True)
        logits = self.supernet(images)
        ce = F.cross_entropy(logits, labels)
        expected = self.expected_cost()
        loss = self.arch_loss(ce, expected)
        self.manual_backward(loss)
        if binary:
            gate_grads = self.supernet.gate_grads()
            if self.trainer.world_size > 1:  # the gates are not parameters: DDP does not average them
                stacked = self.trainer.strategy.reduce(torch.cat(gate_grads), reduce_op="mean")
                gate_grads = list(stacked.split([g.numel() for g in gate_grads]))
            self.supernet.accumulate_arch_grads(gate_grads)
        arch_opt.step()
        if binary:
            self.supernet.rescale_arch()
        values = {"arch/loss": float(loss.detach()), "arch/ce": float(ce.detach()),
                  "arch/expected_cost": float(expected.detach())}
        for key, value in values.items():
            self.log(key, value)
        return values

    def configure_optimizers(self):
        hp = self.hparams
        weights = torch.optim.SGD(self.supernet.weight_param_groups(hp.weight_decay), lr=hp.lr, momentum=hp.momentum,
                                  nesterov=hp.nesterov and hp.momentum > 0)
        arch = torch.optim.Adam(self.supernet.arch_parameters(), lr=hp.arch_lr, betas=tuple(hp.arch_betas),
                                eps=hp.arch_eps, weight_decay=hp.arch_weight_decay)
        return [weights, arch]

    # --- validation: the derived architecture (most probable op per layer) ----------------------
    def on_validation_epoch_start(self) -> None:
        self.supernet.fix()

    def on_validation_model_eval(self) -> None:
        # The running statistics of an op's batch norms were gathered under random upstream paths,
        # not under the derived architecture's; like the reference implementation, validate with
        # batch statistics. Momentum 0 leaves the running statistics as they are.
        super().on_validation_model_eval()
        self._bn_momenta = {}
        for module in self.supernet.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._bn_momenta[module] = module.momentum
                module.train()
                module.momentum = 0.0

    def on_validation_model_train(self) -> None:
        for module, momentum in getattr(self, "_bn_momenta", {}).items():
            module.momentum = momentum
        self._bn_momenta = {}
        super().on_validation_model_train()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self.supernet(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_top1.update(logits, labels)
        self.log("val/acc", self.val_top1, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.table is None:
            return
        ops = self.supernet.derive()
        summary = self.arch_summary()
        self.log("arch/derived_cost", summary["derived_cost"])
        self.log("arch/expected_cost_epoch", summary["expected_cost"])
        self.log("arch/entropy", summary["entropy"])
        self.log("arch/zero_layers", float(sum(op == ZERO for op in ops)))
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            append_line(self.run_dir / ARCH_HISTORY_FILE, json.dumps({
                "epoch": self.current_epoch, "ops": ops, "expected_cost": summary["expected_cost"],
                "derived_cost": summary["derived_cost"]}))

    # --- results --------------------------------------------------------------------------------
    def arch_summary(self) -> dict[str, Any]:
        """The derived ops, probabilities, expected and derived cost, mean entropy."""
        assert self.table is not None
        probs = [p.detach().cpu() for p in self.supernet.probabilities()]
        ops = self.supernet.derive()
        entropy = sum(float(-(p * p.clamp_min(1e-12).log()).sum()) for p in probs) / len(probs)
        return {
            "ops": ops,
            "candidates": [list(layer.candidates) for layer in self.space.layers],
            "probabilities": [[round(float(x), 6) for x in p] for p in probs],
            "expected_cost": float(self.expected_cost().detach()),
            "derived_cost": self.table.arch_cost(self.space, ops),
            "entropy": entropy,
        }

    def derived_record(self) -> dict[str, Any]:
        """The ``derived_arch.json`` record."""
        assert self.table is not None
        hp = self.hparams
        summary = self.arch_summary()
        return derived_arch_record(
            self.space, summary.pop("ops"), **summary, cost={"kind": self.table.kind, "unit": self.table.unit,
                                                             "fixed": self.table.fixed, "scale": hp.cost_scale},
            target=self.target, latency_loss=hp.latency_loss, beta=hp.beta, latency_lambda=hp.latency_lambda,
            mixed_op=hp.mixed_op, epochs=self.current_epoch, global_step=self.global_step)

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero or self.table is None:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        record = self.derived_record()
        write_text(run_dir / DERIVED_ARCH_FILE, json.dumps(record, indent=1))
        net = self.supernet.extract(record["ops"]).cpu().eval()
        # Plain data (weights_only=True loads it): load_derived_model rebuilds the network.
        with replacing(run_dir / DERIVED_MODEL_FILE) as temporary:
            torch.save({"ops": record["ops"], "space": record["space"],
                        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, temporary)


def load_derived_model(path: str | Path, key: str | None = None) -> nn.Module:
    """The network of a ``derived_model.pt`` (ops, space, state dict), read without pickle, in eval mode."""
    from ..nn.safe_load import load_torch_file, require_mapping
    from ..registry import SPACES

    what = "a derived_model.pt of a ProxylessNAS search (ops, space, state_dict)"
    saved = load_torch_file(path, key=key, what=what)
    if isinstance(saved, dict) and isinstance(saved.get("model"), nn.Module) and "state_dict" not in saved:
        return saved["model"].eval()  # an older file, read with allow_pickle: the module itself
    require_mapping(saved, ("ops", "space", "state_dict"), path=path, key=key, what=what)
    net = build_subnet(SPACES.build(saved["space"]), saved["ops"])
    net.load_state_dict(saved["state_dict"])
    return net.eval()
