"""LightningModule training a ParZC ranker on node-wise zero-cost statistics."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics.regression import KendallRankCorrCoef, SpearmanCorrCoef

from lightning_nas.predictors.losses import LOSSES, RankingLoss
from lightning_nas.predictors.parzc import ParZC

from ..errors import RecipeError
from ..recipe.markers import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


class ParZCTask(pl.LightningModule):
    """Ranks architectures from ``[L, K]`` node-wise statistics; higher score = predicted better.

    ``num_nodes`` / ``num_stats`` / ``proxies`` / ``stats_seed`` may be left ``None`` and are
    then read from the datamodule (:class:`lightning_nas.data.zc_stats.ZCStatsDataModule`) at
    setup and written back into the hyper-parameters, so a checkpoint is self-describing:
    :mod:`lightning_nas.tasks.ranking` recomputes the same statistics from it. The min-max
    scaler is fit on the training split at setup and saved with the weights.
    """

    def __init__(
        self,
        num_nodes: int | None = None,
        num_stats: int | None = None,
        proxies: list[str] | None = None,
        stats_seed: int | None = None,
        embed_dim: PositiveInt = 32,
        depth: PositiveInt = 2,
        token_hidden: int = 64,
        channel_hidden: int = 64,
        dropout: Fraction = 0.1,
        bayesian: bool = True,
        prior_sigma: float = 0.1,
        kl_weight: float = 1e-4,
        loss: str = "diffkendall",
        alpha: float = 50.0,
        pairwise_kind: str = "logistic",
        margin: float = 0.1,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-3,
        warmup_epochs: NonNegativeInt = 10,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise RecipeError("unknown ranking loss", key="task.loss", given=loss, allowed=", ".join(LOSSES))
        self.save_hyperparameters()
        self.criterion = RankingLoss(loss, alpha=alpha, pairwise_kind=pairwise_kind, margin=margin)
        self.model: ParZC | None = None
        if num_nodes is not None and num_stats is not None:
            self._build(num_nodes, num_stats)
        self.val_kendall = KendallRankCorrCoef()
        self.val_spearman = SpearmanCorrCoef()

    def _build(self, num_nodes: int, num_stats: int) -> None:
        h = self.hparams
        self.model = ParZC(num_nodes, num_stats, embed_dim=h.embed_dim, depth=h.depth, token_hidden=h.token_hidden,
                           channel_hidden=h.channel_hidden, dropout=h.dropout, bayesian=h.bayesian,
                           prior_sigma=h.prior_sigma)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            if self.model is None:
                raise RuntimeError("ParZCTask needs num_nodes / num_stats, or a ZCStatsDataModule to read them from")
            return
        if self.model is None:
            self.hparams.num_nodes, self.hparams.num_stats = dm.num_nodes, dm.num_stats
            self._build(dm.num_nodes, dm.num_stats)
        if self.hparams.proxies is None and getattr(dm, "proxies", None) is not None:
            self.hparams.proxies = list(dm.proxies)
        if self.hparams.stats_seed is None and getattr(dm, "stats_seed", None) is not None:
            self.hparams.stats_seed = int(dm.stats_seed)
        if stage == "fit":
            self.model.fit_scaler(dm.train_features())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic scores (posterior means) for raw features ``[B, L, K]``."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.model(torch.as_tensor(features).to(self.device)).cpu()
        finally:
            self.train(was_training)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self.model(x)
        loss = self.criterion(pred, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        if self.hparams.bayesian and self.hparams.kl_weight > 0:
            # KL per training example, as in the ELBO of a dataset of this size.
            kl = self.model.kl() * (self.hparams.kl_weight / max(len(y), 1))
            self.log("train/kl", kl, batch_size=len(y))
            loss = loss + kl
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        pred = self.model(x)
        self.log("val/loss", self.criterion(pred, y), batch_size=len(y))
        self.val_kendall.update(pred, y)
        self.val_spearman.update(pred, y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/kendall", self.val_kendall.compute(), prog_bar=True)
        self.log("val/spearman", self.val_spearman.compute())
        self.val_kendall.reset()
        self.val_spearman.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_epochs * max(total // max(self.trainer.max_epochs or 1, 1), 1), total // 2)
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=max(warmup, 1)),
             torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total - warmup, 1))],
            milestones=[max(warmup, 1)],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
