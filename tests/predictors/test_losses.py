from __future__ import annotations

import pytest
import torch
from scipy.stats import kendalltau

from lightning_nas.predictors.losses import (
    RankingLoss,
    diff_kendall,
    diff_kendall_loss,
    kendall_tau,
    mse_loss,
    pairwise_ranking_loss,
    smooth_sign,
)


def _data(n: int = 60, noise: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return y + noise * torch.randn(n, generator=g, dtype=torch.float64), y


def test_exact_kendall_matches_scipy_with_and_without_ties() -> None:
    x, y = _data()
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
    xt, yt = torch.round(x), torch.round(y * 2)
    assert kendall_tau(xt, yt) == pytest.approx(kendalltau(xt, yt).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diffkendall_approaches_kendall_tau_for_large_alpha(seed: int) -> None:
    x, y = _data(seed=seed)
    exact = kendall_tau(x, y)
    errors = [abs(float(diff_kendall(x, y, alpha)) - exact) for alpha in (1.0, 10.0, 1e3, 1e7)]
    assert errors[-1] < 1e-6
    assert errors[0] > errors[-1]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors


def test_smooth_sign() -> None:
    z = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 2.0])
    assert torch.allclose(smooth_sign(z, 1e6), torch.sign(z))
    assert torch.allclose(smooth_sign(z, 3.0), torch.tanh(1.5 * z))


def test_diffkendall_has_useful_gradients() -> None:
    x, y = _data(n=30)
    pred = x.clone().float().requires_grad_(True)
    loss = diff_kendall_loss(pred, y.float(), alpha=5.0)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # A small step against the gradient improves the exact rank correlation on average.
    stepped = (pred - 0.5 * pred.grad / pred.grad.norm()).detach()
    assert kendall_tau(stepped, y) > kendall_tau(x, y)


def test_pairwise_losses_prefer_the_right_order() -> None:
    y = torch.arange(10.0)
    for kind in ("logistic", "hinge"):
        good, bad = pairwise_ranking_loss(y, y, kind), pairwise_ranking_loss(-y, y, kind)
        assert good < bad
    assert pairwise_ranking_loss(torch.randn(5), torch.ones(5)) == 0.0  # only ties: nothing to rank
    with pytest.raises(ValueError, match="hinge"):
        pairwise_ranking_loss(y, y, "square")


def test_ranking_loss_module() -> None:
    pred, y = torch.randn(8, requires_grad=True), torch.randn(8)
    for name in ("diffkendall", "pairwise", "mse"):
        loss = RankingLoss(name)(pred, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
    assert RankingLoss("mse")(pred, y) == mse_loss(pred, y)
    with pytest.raises(ValueError, match="diffkendall"):
        RankingLoss("l1")
    assert diff_kendall(torch.ones(1), torch.ones(1)) == 0.0
