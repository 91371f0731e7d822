"""ParZC: a learned ranker over node-wise zero-cost statistics.

Input: one architecture is an ``[L, K]`` matrix, K proxies measured at L nodes. For
NAS-Bench-201 the nodes are the *weight slots* of the macro skeleton
(:func:`lightning_nas.spaces.nb201.weight_slot_names`): the stem conv, one slot per cell edge
(6 per cell x 15 cells), the three convs of each of the two reduction blocks, and the
classifier, L = 98. An edge whose op has no weights (none, skip, pooling) leaves its slot at
zero, so every architecture has the same token layout and slot ``l`` always means the same
position in the network.

Model:

1. scaling: ``sign(x) log(1 + |x|)`` (the raw statistics span dozens of orders of magnitude,
   e.g. synflow ~1e40 vs fisher ~1e-6), then min-max per (node, proxy) with ranges fit on the
   training architectures only; stored as buffers so a checkpoint carries its scaler;
2. Bayesian embedding: a linear map K -> D applied to every node whose weights are
   ``mu + softplus(rho) * eps`` (eps ~ N(0, 1) resampled every training forward, eps = 0 in
   eval), so repeated stochastic passes give a per-node uncertainty;
3. MLP-Mixer blocks: token mixing across the L nodes, channel mixing across the D features,
   each pre-norm with a residual;
4. head: mean over nodes, a (Bayesian) linear to a scalar score; higher = predicted better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def signed_log(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) log(1 + |x|)`` computed in float64: raw statistics (synflow ~1e50) overflow float32."""
    x = torch.nan_to_num(torch.as_tensor(x).to(torch.float64))
    return torch.sign(x) * torch.log1p(x.abs())


class BayesLinear(nn.Module):
    """Linear layer with a factorised Gaussian posterior over weights and bias."""

    def __init__(self, in_features: int, out_features: int, prior_sigma: float = 0.1, rho_init: float = -5.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.prior_sigma = in_features, out_features, prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), rho_init))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), rho_init))
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        self.sample = False  # also sample in eval mode (for uncertainty estimates)

    def _draw(self, mu: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        if self.training or self.sample:
            return mu + F.softplus(rho) * torch.randn_like(mu)
        return mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._draw(self.weight_mu, self.weight_rho), self._draw(self.bias_mu, self.bias_rho))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, prior_sigma^2)) summed over all weights and biases."""
        total = self.weight_mu.new_zeros(())
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sigma = F.softplus(rho)
            total = total + (math.log(self.prior_sigma) - torch.log(sigma)
                             + (sigma**2 + mu**2) / (2 * self.prior_sigma**2) - 0.5).sum()
        return total


def _linear(in_f: int, out_f: int, bayesian: bool, prior_sigma: float) -> nn.Module:
    return BayesLinear(in_f, out_f, prior_sigma) if bayesian else nn.Linear(in_f, out_f)


class MixerBlock(nn.Module):
    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, token_hidden), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(token_hidden, num_tokens))
        self.norm_channels = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Dropout(dropout),
                                         nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        x = x + self.token_mlp(self.norm_tokens(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm_channels(x))


class ParZC(nn.Module):
    """Scores architectures from their ``[L, K]`` node-wise statistics (raw, unscaled)."""

    def __init__(self, num_nodes: int, num_stats: int, embed_dim: int = 32, depth: int = 2, token_hidden: int = 64,
                 channel_hidden: int = 64, dropout: float = 0.1, bayesian: bool = True,
                 prior_sigma: float = 0.1) -> None:
        super().__init__()
        self.num_nodes, self.num_stats = num_nodes, num_stats
        self.register_buffer("feat_min", torch.zeros(num_nodes, num_stats))
        self.register_buffer("feat_scale", torch.ones(num_nodes, num_stats))
        self.embed = _linear(num_stats, embed_dim, bayesian, prior_sigma)
        self.blocks = nn.Sequential(*[MixerBlock(num_nodes, embed_dim, token_hidden, channel_hidden, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = _linear(embed_dim, 1, bayesian, prior_sigma)

    @torch.no_grad()
    def fit_scaler(self, features: torch.Tensor) -> None:
        """Min-max ranges per (node, proxy) from the *training* architectures ``[A, L, K]``."""
        z = signed_log(torch.as_tensor(features, device=self.feat_min.device)).to(self.feat_min.dtype)
        lo, hi = z.amin(0), z.amax(0)
        span = hi - lo
        self.feat_min.copy_(lo)
        # Constant features (e.g. a slot that is always empty) map to 0 rather than dividing by 0.
        self.feat_scale.copy_(torch.where(span > 0, 1.0 / span.clamp_min(1e-12), torch.ones_like(span)))

    def scale(self, features: torch.Tensor) -> torch.Tensor:
        """Raw statistics (any float dtype; pass float64 to keep values beyond float32's range)."""
        return (signed_log(features).to(self.feat_min.dtype) - self.feat_min) * self.feat_scale

    def embed_nodes(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-2:] != (self.num_nodes, self.num_stats):
            raise ValueError(f"expected features [..., {self.num_nodes}, {self.num_stats}], got {tuple(features.shape)}")
        return self.embed(self.scale(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed_nodes(features))
        return self.head(self.norm(x).mean(1)).squeeze(-1)

    def kl(self) -> torch.Tensor:
        return sum((m.kl() for m in self.modules() if isinstance(m, BayesLinear)), torch.zeros(()))

    @torch.no_grad()
    def predict_with_uncertainty(self, features: torch.Tensor, samples: int = 16) -> dict[str, torch.Tensor]:
        """Monte-Carlo over the Bayesian weights: score mean / std and per-node embedding std ``[B, L]``."""
        was_training = self.training
        self.eval()
        bayes = [m for m in self.modules() if isinstance(m, BayesLinear)]
        for m in bayes:
            m.sample = True
        try:
            scores = torch.stack([self(features) for _ in range(samples)])
            node_emb = torch.stack([self.embed_nodes(features) for _ in range(samples)])
        finally:
            for m in bayes:
                m.sample = False
            self.train(was_training)
        return {"mean": scores.mean(0), "std": scores.std(0), "node_std": node_emb.std(0).mean(-1)}
