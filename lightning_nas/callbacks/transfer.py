"""APQ's predictor transfer as a callback: once the quantized pairs are in, train the
quantization-aware predictor starting from the full-precision predictor's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from ..errors import RecipeError
from ..recipe.markers import ExistingFile, SpaceSpec
from ..targets import TargetName


class PredictorTransfer(pl.Callback):
    """Train a :class:`~lightning_nas.tasks.predictor.PredictorTask` on the quantized pairs of
    ``store`` with ``transfer_from`` = the fp32 predictor, at the end of the fit that collected them.

    Put it after the :class:`~lightning_nas.callbacks.pairs.QuantizedPairCollector` in the recipe
    (callbacks run in recipe order). The predictor, its metrics and scatter plot go to ``out_dir``
    (default ``run_dir/predictor_quant``), the same files as ``recipes/predictor_quant.yaml``
    writes; with a W&B logger on the outer fit, the inner training logs to it too. ``target``
    (the collector's) trains on that target's pairs only, in a store that holds several.
    """

    def __init__(self, fp32_predictor: ExistingFile, space: SpaceSpec, store: str | None = None,
                 out_dir: str | None = None, min_pairs: int = 10, hidden: int = 400, layers: int = 3,
                 lr: float = 1e-3, weight_decay: float = 1e-4, epochs: int = 200, val_fraction: float = 0.2,
                 batch_size: int = 256, policy_bits: list[int] = [4, 6, 8], seed: int = 0,  # noqa: B006
                 allow_mixed_targets: bool = False, target: TargetName | None = None) -> None:
        self.allow_mixed_targets, self.target = allow_mixed_targets, target
        self.fp32_predictor, self.space, self.store, self.out_dir = fp32_predictor, space, store, out_dir
        self.min_pairs, self.hidden, self.layers, self.lr = min_pairs, hidden, layers, lr
        self.weight_decay, self.epochs, self.val_fraction = weight_decay, epochs, val_fraction
        self.batch_size, self.policy_bits, self.seed = batch_size, policy_bits, seed
        self.task: Any = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from ..data.pairs import PairsDataModule
        from ..predictors.pair_store import PairStore
        from ..tasks.predictor import PredictorTask
        from .pairs import DEFAULT_STORE

        run_dir = Path(trainer.default_root_dir)
        store = Path(self.store) if self.store else run_dir / DEFAULT_STORE
        from ..targets import resolve_target

        pairs = PairStore(store).pairs(kind="quant") if store.is_file() else []
        if self.target is not None:
            wanted = resolve_target(self.target, key="callbacks.transfer.init_args.target").name
            pairs = [p for p in pairs if p.target == wanted]
        count = len(pairs)
        if count < self.min_pairs:
            of = "" if self.target is None else f" of target {wanted}"
            raise RecipeError(f"PredictorTransfer: {store} has {count} quantized pairs{of}, fewer than min_pairs="
                             f"{self.min_pairs}; put the QuantizedPairCollector before it in the recipe", key="callbacks")
        out_dir = Path(self.out_dir) if self.out_dir else run_dir / "predictor_quant"
        rank_zero_info(f"predictor transfer: {count} quantized pairs, fp32 weights from {self.fp32_predictor}")
        pl.seed_everything(self.seed, verbose=False)
        data = PairsDataModule(path=str(store), space=dict(self.space), kind="quant", val_fraction=self.val_fraction,
                               seed=self.seed, batch_size=self.batch_size, policy_bits=list(self.policy_bits),
                               allow_mixed_targets=self.allow_mixed_targets, target=self.target)
        self.task = PredictorTask(hidden=self.hidden, layers=self.layers, lr=self.lr, weight_decay=self.weight_decay,
                                  transfer_from=str(self.fp32_predictor))
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        inner = pl.Trainer(max_epochs=self.epochs, accelerator="cpu", devices=1, default_root_dir=str(out_dir),
                           logger=loggers or False, enable_checkpointing=False, enable_model_summary=False,
                           enable_progress_bar=False, log_every_n_steps=1)
        inner.fit(self.task, datamodule=data)
