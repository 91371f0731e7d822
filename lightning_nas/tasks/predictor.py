"""Train an accuracy predictor on stored pairs; optionally transfer from a full-precision one.

At the end of training the predictor (``predictor.pt``), its validation metrics
(``predictor_metrics.json``: RMSE, Kendall tau, Spearman) and a predicted-versus-measured scatter
plot (``predictor_scatter.png``) are written to the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

from ..errors import RecipeError
from ..files import save_png, write_text
from ..predictors.accuracy import AccuracyPredictor, QuantAccuracyPredictor, load_predictor, save_predictor
from ..recipe.markers import ExistingFile, NonNegativeFloat, PositiveFloat, PositiveInt

METRICS_FILE = "predictor_metrics.json"
SCATTER_FILE = "predictor_scatter.png"
PREDICTOR_FILE = "predictor.pt"


def regression_metrics(predicted: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    return {
        "rmse": float(torch.sqrt(F.mse_loss(predicted, measured))),
        "kendall_tau": float(kendall_rank_corrcoef(predicted, measured)),
        "spearman": float(spearman_corrcoef(predicted, measured)),
        "count": int(len(measured)),
    }


class PredictorTask(pl.LightningModule):
    """MLP accuracy predictor; sizes come from the data module's space and policy encodings."""

    def __init__(self, hidden: PositiveInt = 400, layers: PositiveInt = 3, lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 1e-4,
                 transfer_from: ExistingFile | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.predictor: AccuracyPredictor | None = None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.final_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        if self.predictor is not None:
            return
        data = self.trainer.datamodule
        data.setup(stage)
        arch_features = data.space.encoding_size
        hp = self.hparams
        if data.policy_features:
            self.predictor = QuantAccuracyPredictor(arch_features, data.policy_features, hp.hidden, hp.layers,
                                                    data.train_mean)
            if hp.transfer_from:
                source = load_predictor(hp.transfer_from, key="task.transfer_from")
                theirs = {k: v for k, v in source.spec().items() if k != "policy_features"}
                ours = {k: v for k, v in self.predictor.spec().items() if k != "policy_features"}
                if type(source) is not AccuracyPredictor or theirs != ours:
                    raise RecipeError("cannot transfer from this predictor: a full-precision predictor of the same "
                                      "encoding and size is needed", key="task.transfer_from", given=hp.transfer_from,
                                      allowed=f"a full-precision predictor with {ours} (this one: {source.spec()})")
                self.predictor.inherit(source)
        else:
            if hp.transfer_from:
                raise RecipeError("transfer_from needs quantized pairs", key="task.transfer_from",
                                  given=hp.transfer_from, allowed="data.kind=quant, or no transfer_from")
            self.predictor = AccuracyPredictor(arch_features, hp.hidden, hp.layers, data.train_mean)

    def forward(self, arch: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        return self.predictor(arch, policy if policy.shape[-1] else None)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        arch, policy, target = batch
        loss = F.mse_loss(self(arch, policy), target)
        self.log("train/mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        arch, policy, target = batch
        self._val_outputs.append((self(arch, policy).detach(), target))

    def on_validation_epoch_end(self) -> None:
        predicted = torch.cat([p for p, _ in self._val_outputs])
        measured = torch.cat([m for _, m in self._val_outputs])
        self._val_outputs.clear()
        metrics = regression_metrics(predicted, measured)
        self.final_metrics = {**metrics, "predicted": predicted.tolist(), "measured": measured.tolist()}
        self.log("val/rmse", metrics["rmse"], prog_bar=True)
        self.log("val/kendall", metrics["kendall_tau"], prog_bar=True)
        self.log("val/spearman", metrics["spearman"])

    # The last validation's figures travel in the checkpoint: a run resumed after its last epoch
    # (killed before writing its outputs) still writes them when the fit ends.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["final_metrics"] = dict(self.final_metrics)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.final_metrics = dict(checkpoint.get("final_metrics") or {})

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero or not self.final_metrics:
            return
        run_dir = Path(self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        data = self.trainer.datamodule
        summary = {k: v for k, v in self.final_metrics.items() if k not in {"predicted", "measured"}}
        summary.update(train_pairs=len(data.train_set), kind=data.kind, target=getattr(data, "target", None),
                       transfer_from=self.hparams.transfer_from)
        write_text(run_dir / METRICS_FILE, json.dumps(summary, indent=2))
        save_predictor(self.predictor, run_dir / PREDICTOR_FILE, space=type(data.space).__name__,
                       target=getattr(data, "target", None))
        self._scatter(run_dir / SCATTER_FILE, summary)

    def _scatter(self, path: Path, summary: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        measured, predicted = self.final_metrics["measured"], self.final_metrics["predicted"]
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        axis.scatter(measured, predicted, s=10, alpha=0.7)
        low, high = min(measured + predicted), max(measured + predicted)
        axis.plot([low, high], [low, high], color="gray", linewidth=1)
        axis.set_xlabel("measured top-1 (%)")
        axis.set_ylabel("predicted top-1 (%)")
        axis.set_title(f"{summary['kind']}: RMSE {summary['rmse']:.2f}, tau {summary['kendall_tau']:.3f}")
        save_png(figure, path)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="val/predicted_vs_measured", images=[str(path)])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
