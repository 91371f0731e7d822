"""Ranking losses for predictors: DiffKendall, pairwise ranking, MSE; and exact Kendall tau.

Ranking predictors are judged by rank correlation, so they are trained on whole sets of
architectures: every loss here takes a 1-D batch of predictions and targets and compares all
pairs ``i < j`` (O(n^2) memory, fine for the few hundred to few thousand architectures a batch
holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pair_diffs(x: torch.Tensor) -> torch.Tensor:
    """``x_i - x_j`` for all pairs ``i < j`` of a 1-D tensor."""
    x = x.reshape(-1)
    i, j = torch.triu_indices(x.numel(), x.numel(), offset=1, device=x.device)
    return x[i] - x[j]


def smooth_sign(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sigmoid(a z) - sigmoid(-a z)`` (= tanh(a z / 2)): a differentiable sign, exact as a -> inf."""
    return torch.sigmoid(alpha * z) - torch.sigmoid(-alpha * z)


def diff_kendall(pred: torch.Tensor, target: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """Differentiable Kendall tau: mean over pairs of ``s(dx) * s(dy)`` (tau-a as alpha -> inf)."""
    if pred.numel() < 2:
        return pred.sum() * 0.0
    return (smooth_sign(_pair_diffs(pred), alpha) * smooth_sign(_pair_diffs(target), alpha)).mean()


def diff_kendall_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    return -diff_kendall(pred, target, alpha)


def pairwise_ranking_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "logistic", margin: float = 0.1
) -> torch.Tensor:
    """Mean over ordered pairs (ties in ``target`` skipped) of a logistic or hinge penalty.

    ``logistic``: ``log(1 + exp(-sign(dy) dx))`` (RankNet); ``hinge``: ``max(0, margin - sign(dy) dx)``.
    """
    dx, dy = _pair_diffs(pred), _pair_diffs(target)
    keep = dy != 0
    if not bool(keep.any()):
        return pred.sum() * 0.0
    signed = torch.sign(dy[keep]) * dx[keep]
    if kind == "logistic":
        return F.softplus(-signed).mean()
    if kind == "hinge":
        return F.relu(margin - signed).mean()
    raise ValueError(f"unknown pairwise loss kind {kind!r}; allowed: logistic, hinge")


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.reshape(-1), target.reshape(-1))


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact Kendall tau-b (equals tau-a when neither input has ties); reference for tests."""
    sx, sy = torch.sign(_pair_diffs(x.double())), torch.sign(_pair_diffs(y.double()))
    concordance = (sx * sy).sum()
    denom = torch.sqrt((sx != 0).sum().double() * (sy != 0).sum().double())
    return float(concordance / denom) if float(denom) > 0 else 0.0


LOSSES = ("diffkendall", "pairwise", "mse")


class RankingLoss(nn.Module):
    """One of :data:`LOSSES` behind a module interface (``loss(pred, target)``)."""

    def __init__(self, name: str = "diffkendall", alpha: float = 10.0, pairwise_kind: str = "logistic",
                 margin: float = 0.1) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
        self.name, self.alpha, self.pairwise_kind, self.margin = name, alpha, pairwise_kind, margin

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == "diffkendall":
            return diff_kendall_loss(pred, target, self.alpha)
        if self.name == "pairwise":
            return pairwise_ranking_loss(pred, target, self.pairwise_kind, self.margin)
        return mse_loss(pred, target)
