"""Collect <architecture, accuracy> pairs from a trained supernet into a pair store.

Runs when a fit ends: at the end of supernet training (as a callback of its recipe), or in a
recipe that loads a supernet checkpoint and trains for zero epochs. The plan is deterministic
(pair ``i`` is drawn from a generator seeded by ``seed`` and ``i``), pairs already in the store
are skipped, so a killed collection resumes where it stopped, and ranks (on any number of nodes)
split the rest; only global rank 0 touches the store.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..files import write_json
from ..nn.bn_recalibration import recalibrate_batchnorm
from ..nn.evaluation import evaluate
from ..predictors.pair_store import Pair, PairStore, plan_key
from ..recipe.markers import BitChoices
from ..spaces.protocol import ElasticSpace
from ..targets import TargetName, check_same_target, resolve_target

DEFAULT_STORE = "pairs.sqlite"


def state_hash(module: torch.nn.Module) -> str:
    """A short hash of a network's weights and buffers: which supernet a pair was measured on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def split_holdout(datamodule: Any, bn_images: int, eval_images: int, batch_size: int) -> tuple[list, list]:
    """Held-out images for BN recalibration, then the next ones (with labels) for evaluation."""
    needed = bn_images + eval_images
    available = len(datamodule.holdout_set)
    if available < needed:
        raise RecipeError(f"pair collection needs {needed} held-out images (bn_images + eval_images), the data "
                         f"module holds out {available}: raise data.holdout_size or lower them", key="data.holdout_size")
    images, labels = [], []
    for x, y in datamodule.holdout_dataloader(batch_size=batch_size):
        images.append(x)
        labels.append(y)
    images, labels = torch.cat(images)[:needed], torch.cat(labels)[:needed]
    bn = list(images[:bn_images].split(batch_size))
    evaluation = list(zip(images[bn_images:].split(batch_size), labels[bn_images:].split(batch_size)))
    return bn, evaluation


def plan_rng(seed: int, index: int) -> random.Random:
    """The generator that draws pair ``index`` of the plan ``seed`` (its architecture, then its
    policy): the same pair for every collector and for benchmarks/qat_length_curve.py."""
    return random.Random(f"pairs-{seed}-{index}")


def gather_to_zero(trainer: pl.Trainer, items: list[Any]) -> list[Any]:
    """Every rank's ``items`` on global rank 0 (in rank order); the other ranks get ``[]``.

    Through ``torch.distributed`` directly: Lightning strategies gather tensors only, and every
    multi-process strategy (DDP, FSDP, DeepSpeed, on any number of nodes) initialises it.
    """
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(items)
    gathered: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
    torch.distributed.gather_object(items, gathered, dst=0)
    return [item for part in gathered or [] for item in part]


class AccuracyPairCollector(pl.Callback):
    """Full-precision pairs: sample, recalibrate BN, evaluate on held-out images, store.

    Under DDP every rank measures its share of the plan's missing pairs; every ``write_every``
    pairs per rank, the pairs are gathered to global rank 0, which alone opens the store and
    writes them in one transaction. Resume: rank 0 reads the done keys and broadcasts them.
    """

    kind = "fp32"
    #: The deployment target of quantized pairs (full-precision pairs have none).
    target: str | None = None

    def __init__(self, num_pairs: int = 1000, store: str | None = None, seed: int = 0, bn_images: int = 2000,
                 eval_images: int = 2000, batch_size: int = 200, write_every: int = 4) -> None:
        if write_every < 1:
            raise ValueError(f"write_every must be at least 1, got {write_every}")
        self.num_pairs, self.store_path, self.seed = num_pairs, store, seed
        self.bn_images, self.eval_images, self.batch_size = bn_images, eval_images, batch_size
        self.write_every = write_every
        self.collection: dict[str, Any] = {}  # this run's throughput, for the summary

    def check_store(self, store: PairStore) -> None:
        """Refuse a store this collector must not add to (rank 0, before any pair is measured)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        zero = trainer.is_global_zero
        store = PairStore(self.store_path or Path(trainer.default_root_dir) / DEFAULT_STORE) if zero else None
        if store is not None:
            self.check_store(store)
        datamodule = trainer.datamodule
        bn_batches, eval_batches = split_holdout(datamodule, self.bn_images, self.eval_images, self.batch_size)
        supernet = pl_module.supernet
        # Rank 0's hash names the pairs on every rank (the weights are the same under DDP).
        checkpoint = trainer.strategy.broadcast(state_hash(supernet) if zero else None, src=0)
        saved = {k: v.clone() for k, v in supernet.state_dict().items()}
        # a quantized pair's key names its target: a pair measured on another grid is not done here
        done = trainer.strategy.broadcast(
            store.done_plan_keys(checkpoint, self.kind, self.seed, self.target) if store is not None else None, src=0)
        missing = [i for i in range(self.num_pairs)
                   if plan_key(checkpoint, self.kind, self.seed, i, self.target) not in done]
        mine = missing[trainer.global_rank::trainer.world_size]
        # The same number of gather rounds on every rank (shares differ by at most one pair).
        rounds = math.ceil(math.ceil(len(missing) / trainer.world_size) / self.write_every)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(f"{self.kind} pairs"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.1f} pairs/min"), TimeRemainingColumn()]
        started = time.perf_counter()
        written = 0
        with Progress(*columns, disable=not zero) as progress:
            bar = progress.add_task("pairs", total=len(missing), rate=0.0)
            for round_index in range(rounds):
                batch = []
                for index in mine[round_index * self.write_every:(round_index + 1) * self.write_every]:
                    key = plan_key(checkpoint, self.kind, self.seed, index, self.target)
                    if store is not None and store.has(key):  # another collector on this store measured it
                        progress.update(bar, advance=1)
                        continue
                    pair_started = time.perf_counter()
                    pair = self.measure(pl_module, datamodule, plan_rng(self.seed, index), bn_batches, eval_batches)
                    batch.append(Pair(**pair, checkpoint_hash=checkpoint, seed=self.seed, kind=self.kind,
                                      target=self.target,
                                      seconds=time.perf_counter() - pair_started,
                                      pair_key=key))
                gathered = gather_to_zero(trainer, batch)
                if store is not None:
                    store.add_many(gathered)
                    written += len(gathered)
                    progress.update(bar, advance=len(gathered),
                                    rate=60 * written / (time.perf_counter() - started))
        self.collection = {"world_size": trainer.world_size, "collected": written,
                           "collection_seconds": time.perf_counter() - started}
        supernet.load_state_dict(saved)
        if store is not None:
            self.report(trainer, store, checkpoint)

    def report(self, trainer: pl.Trainer, store: PairStore, checkpoint: str) -> dict[str, Any]:
        """``run_dir/pairs_<kind>_summary.json`` (count, cost per pair, accuracy range) and, with a
        W&B logger, the pairs as a table and the cost as a metric."""
        import json
        import statistics

        pairs = store.pairs(kind=self.kind, checkpoint_hash=checkpoint)
        if not pairs:
            return {}
        seconds, top1 = [p.seconds for p in pairs], [p.top1 for p in pairs]
        summary = {"kind": self.kind, "target": self.target, "pairs": len(pairs), "store": str(store.path), "checkpoint_hash": checkpoint,
                   "seconds_per_pair_mean": statistics.fmean(seconds),
                   "seconds_per_pair_median": statistics.median(seconds),
                   "top1_mean": statistics.fmean(top1), "top1_min": min(top1), "top1_max": max(top1),
                   "threads": torch.get_num_threads(), **self.collection}
        if summary.get("collected") and summary["collection_seconds"] > 0:
            summary["pairs_per_minute"] = 60 * summary["collected"] / summary["collection_seconds"]
        path = Path(trainer.default_root_dir) / f"pairs_{self.kind}_summary.json"
        write_json(path, summary)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                columns = ["arch", "policy", "resolution", "top1", "loss", "seconds"]
                rows = [[json.dumps(p.arch), json.dumps(p.policy), p.resolution, p.top1, p.loss, p.seconds]
                        for p in pairs]
                logger.log_table(key=f"pairs/{self.kind}", columns=columns, data=rows)
                logger.log_metrics({f"pairs/{self.kind}_seconds_per_pair": summary["seconds_per_pair_mean"],
                                    f"pairs/{self.kind}_count": float(len(pairs))})
        return summary

    def measure(self, pl_module: Any, datamodule: Any, rng: random.Random, bn_batches: list,
                eval_batches: list) -> dict[str, Any]:
        space: ElasticSpace = pl_module.space
        supernet, device = pl_module.supernet, pl_module.device
        config = space.sample(rng)
        resolution = config["r"]
        supernet.set_active(config)
        recalibrate_batchnorm(supernet, (datamodule.normalize(b.to(device), resolution) for b in bn_batches))
        batches = [(datamodule.normalize(x.to(device), resolution), y.to(device)) for x, y in eval_batches]
        top1, loss = evaluate(supernet, batches)
        return {"arch": space.canonical(config), "policy": None, "resolution": resolution, "top1": top1,
                "loss": loss}


class QuantizedPairCollector(AccuracyPairCollector):
    """Quantized pairs: sample an architecture and a policy, extract the subnet with the supernet's
    weights, recalibrate BN, calibrate activation ranges, finetune briefly with quantization-aware
    training, evaluate on held-out images, store. Expensive per pair: this is why the quantized
    predictor is transferred from the full-precision one.

    ``target`` (:mod:`lightning_nas.targets`) fixes the fake-quantization grid, the one QAT trains
    for it (7-bit 8-bit-weights without VNNI; on ONNX Runtime, biases on its int32 grid), and is
    stored with every pair and in its plan key, so a store resumes each target's plan apart;
    adding pairs of another target to a store that holds some stops with a recipe error unless
    ``allow_mixed_targets``."""

    kind = "quant"

    def __init__(self, num_pairs: int = 200, store: str | None = None, seed: int = 0, bn_images: int = 2000,
                 eval_images: int = 2000, batch_size: int = 200, finetune_steps: int = 50, lr: float = 1e-3,
                 momentum: float = 0.9, policy_bits: BitChoices = [4, 6, 8],  # noqa: B006
                 write_every: int = 4, target: TargetName = "auto",
                 allow_mixed_targets: bool = False) -> None:
        super().__init__(num_pairs, store, seed, bn_images, eval_images, batch_size, write_every)
        self.deploy_target = resolve_target(target, key="callbacks.pairs.init_args.target")
        self.target = self.deploy_target.name
        self.allow_mixed_targets = allow_mixed_targets
        self.finetune_steps, self.lr, self.momentum, self.policy_bits = finetune_steps, lr, momentum, policy_bits
        self._finetune_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def check_store(self, store: PairStore) -> None:
        check_same_target({f"pairs in {store.path} ({t})": t for t in store.targets(self.kind)}, self.target,
                          self.allow_mixed_targets, key="callbacks.pairs.init_args.target")

    def finetune_batches(self, datamodule: Any, steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``steps`` (default ``finetune_steps``) training batches, drawn once and shared
        by every pair: each pair is finetuned on the same images (less noise between pairs), and the
        augmentation cost (a fifth of a pair's time on CIFAR-10 in a profile) is paid once. A shorter
        finetuning gets a prefix of the same batches, so lengths differ by their steps alone."""
        steps = self.finetune_steps if steps is None else steps
        if self._finetune_batches is None or len(self._finetune_batches) < steps:
            wanted = max(steps, self.finetune_steps)
            batches: list[tuple[torch.Tensor, torch.Tensor]] = []
            while len(batches) < wanted:
                for batch in datamodule.train_dataloader():
                    batches.append((batch[0], batch[1]))
                    if len(batches) >= wanted:
                        break
            self._finetune_batches = batches
        cached = self._finetune_batches
        return cached if len(cached) == steps else cached[:steps]

    def measure(self, pl_module: Any, datamodule: Any, rng: random.Random, bn_batches: list,
                eval_batches: list, finetune_steps: int | None = None) -> dict[str, Any]:
        """One pair; ``finetune_steps`` (default the collector's) is the QAT length, which
        benchmarks/qat_length_curve.py varies to choose the collector's."""
        config, policy, subnet = self.quantized_subnet(pl_module, datamodule, rng, bn_batches, finetune_steps)
        resolution, device = config["r"], pl_module.device
        batches = [(datamodule.normalize(x.to(device), resolution), y.to(device)) for x, y in eval_batches]
        top1, loss = evaluate(subnet, batches)
        return {"arch": config, "policy": policy, "resolution": resolution, "top1": top1, "loss": loss}

    def quantized_subnet(self, pl_module: Any, datamodule: Any, rng: random.Random, bn_batches: list,
                         finetune_steps: int | None = None
                         ) -> tuple[dict[str, Any], dict[str, list[int]], torch.nn.Module]:
        """Draw pair ``rng``'s architecture and policy; return them with the subnet finetuned on the
        target's grid for ``finetune_steps`` (default the collector's), the network :meth:`measure`
        evaluates."""
        from ..nn.quantize_model import attach_bias_grids, attach_quantizers, calibrate_activation_ranges
        from ..spaces.quant_policy import QuantPolicySpace

        space: ElasticSpace = pl_module.space
        supernet, device = pl_module.supernet, pl_module.device
        config = space.canonical(space.sample(rng))
        policy = QuantPolicySpace(bit_choices=self.policy_bits).sample(rng, space.num_blocks)
        resolution = config["r"]
        bn_inputs = [datamodule.normalize(b.to(device), resolution) for b in bn_batches]
        supernet.set_active(config)
        recalibrate_batchnorm(supernet, bn_inputs)
        subnet = supernet.extract(config)
        bits = QuantPolicySpace(bit_choices=self.policy_bits).bits_for_layers(space.layer_specs(config), policy)
        attach_quantizers(subnet, bits, reduce_weight_range=self.deploy_target.reduced_weights)
        if self.deploy_target.runtime == "onnxruntime":
            # the int32 bias grid QAT trains for this runtime (QATTask): the extracted subnet is
            # traceable, the supernet is not; active once ranges are calibrated, and on a batch
            # norm only with running statistics (evaluation), as in QAT
            attach_bias_grids(subnet)
        calibrate_activation_ranges(subnet, bn_inputs)
        steps = self.finetune_steps if finetune_steps is None else finetune_steps
        if steps > 0:
            optimizer = torch.optim.SGD(subnet.parameters(), lr=self.lr, momentum=self.momentum)
            subnet.train()
            for images, labels in self.finetune_batches(datamodule, steps):
                images = datamodule.normalize(images.to(device), resolution)
                loss = F.cross_entropy(subnet(images), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return config, policy, subnet
