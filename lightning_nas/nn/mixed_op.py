"""Mixed operations of a differentiable architecture search.

:class:`BinaryGateMixedOp` is ProxylessNAS's path-binarised mixed op. Each op ``i`` has an
architecture logit ``alpha_i`` and probability ``p = softmax(alpha)``. Binary gates ``g`` (one-hot)
select one path, so the output is ``sum_i g_i o_i(x) = o_active(x)`` and only one path's
activations are kept, whatever the number of candidates:

* **weight steps** (``sample_path``): one path is drawn from ``p`` and runs alone; the other ops
  and the logits are untouched.
* **architecture steps** (``sample_pair``): two paths are drawn from ``p`` without replacement and
  all others are masked out as if they did not exist; of the two, the active one is drawn from
  their renormalised probabilities. The forward pass runs the active path with its graph and the
  inactive one without (only its output is kept, for the gate gradient), so memory stays at one
  path plus one output tensor. After backward, ``dL/dg_j = <dL/dout, o_j(x)>`` for the two
  sampled paths gives the logits' gradient through the softmax over the pair (the paper's
  ``dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i)``), see :func:`two_path_alpha_grad`.
* **rescaling** (``rescale_pair_``): after the optimizer step the two updated logits are shifted
  by a common offset so that ``exp(alpha_a) + exp(alpha_b)`` is what it was: the probabilities of
  the unsampled paths do not move.

:class:`AllPathsMixedOp` is the DARTS-style continuous relaxation ``sum_i p_i o_i(x)``: every
path runs with its graph, so activation memory grows linearly with the number of candidates. It
exists for the memory comparison and as a baseline search mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AllPathsMixedOp",
    "BinaryGateMixedOp",
    "MixedOp",
    "ZeroOp",
    "rescale_pair_",
    "two_path_alpha_grad",
]


class ZeroOp(nn.Module):
    """The skip candidate: contributes nothing, the layer's shortcut carries the input."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def two_path_alpha_grad(alpha: Tensor, pair: Sequence[int], gate_grad: Tensor) -> Tensor:
    """Gradient of the loss w.r.t. ``alpha`` estimated from the binary gates of two sampled paths.

    Only the two sampled paths exist for this estimate, with probabilities ``q = softmax(alpha[pair])``:
    ``dL/dalpha_i = sum_j dL/dg_j q_j (delta_ij - q_i)`` for ``i, j`` in the pair; other entries are 0.
    """
    index = torch.as_tensor(list(pair), device=alpha.device)
    q = torch.softmax(alpha.detach()[index], dim=0)
    g = gate_grad.detach()[index].to(q.dtype)
    # sum_j g_j q_j (delta_ij - q_i) = q_i g_i - q_i sum_j q_j g_j
    local = q * g - q * (q * g).sum()
    grad = torch.zeros_like(alpha, dtype=q.dtype)
    grad[index] = local
    return grad


@torch.no_grad()
def rescale_pair_(alpha: Tensor, pair: Sequence[int], alpha_before: Tensor) -> None:
    """Shift the updated logits of ``pair`` in place so that their ``sum(exp)`` equals its value before
    the update: the softmax probabilities of all other entries come back to their old values."""
    index = torch.as_tensor(list(pair), device=alpha.device)
    offset = torch.logsumexp(alpha[index], 0) - torch.logsumexp(alpha_before[index], 0)
    alpha[index] -= offset


class MixedOp(nn.Module):
    """Candidates with architecture logits ``alpha`` (initialised to 0: uniform probabilities)."""

    def __init__(self, candidates: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
        super().__init__()
        if len(candidates) < 1:
            raise ValueError("a mixed op needs at least one candidate")
        if names is not None and len(names) != len(candidates):
            raise ValueError(f"{len(names)} names for {len(candidates)} candidates")
        self.candidates = nn.ModuleList(candidates)
        self.names = list(names) if names is not None else [str(i) for i in range(len(candidates))]
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))
        #: Index of the op that runs in ``single`` / ``fixed`` mode.
        self.active = 0

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def probs(self) -> Tensor:
        return F.softmax(self.alpha, dim=0)

    def argmax(self) -> int:
        return int(self.alpha.detach().argmax())

    def fix(self, index: int | None = None) -> None:
        """Run one op deterministically (default: the most probable one)."""
        self.active = self.argmax() if index is None else int(index)
        self.mode = "fixed"

    @property
    def active_is_zero(self) -> bool:
        """The running op is the zero op (callers may skip the call and use the shortcut only)."""
        return self.mode in ("single", "fixed") and isinstance(self.candidates[self.active], ZeroOp)


class BinaryGateMixedOp(MixedOp):
    """ProxylessNAS mixed op with path binarisation (see the module docstring)."""

    def __init__(self, candidates: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
        super().__init__(candidates, names)
        self.mode: Literal["single", "two", "fixed"] = "fixed"
        self.pair: tuple[int, int] | None = None
        # Binary gates of the current architecture step: a leaf tensor, not a parameter (it is not
        # trained and must stay out of state dicts and optimizers).
        self.gates: Tensor | None = None
        self._alpha_before: Tensor | None = None

    # --- sampling -----------------------------------------------------------------------------
    def sample_path(self, generator: torch.Generator | None = None, uniform: bool = False) -> int:
        """Weight step: draw one path from ``softmax(alpha)`` (uniformly during warm-up)."""
        weights = torch.ones(self.num_candidates) if uniform else self.probs().detach().float().cpu()
        self.active = int(torch.multinomial(weights, 1, generator=generator))
        self.mode = "single"
        self.pair = None
        self.gates = None
        return self.active

    def sample_pair(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Architecture step: draw two distinct paths from ``softmax(alpha)``; returns (active, inactive).

        With a single candidate there is nothing to learn: it runs as in a weight step.
        """
        if self.num_candidates < 2:
            self.sample_path(generator)
            return self.active, self.active
        probs = self.probs().detach().float().cpu()
        pair = torch.multinomial(probs, 2, replacement=False, generator=generator).tolist()
        renormalised = torch.softmax(self.alpha.detach().float().cpu()[pair], dim=0)
        first = int(torch.multinomial(renormalised, 1, generator=generator))
        self.active = pair[first]
        self.pair = (pair[first], pair[1 - first])
        gates = torch.zeros(self.num_candidates, device=self.alpha.device, dtype=self.alpha.dtype)
        gates[self.active] = 1.0
        self.gates = gates.requires_grad_(True)
        self._alpha_before = self.alpha.detach().clone()
        self.mode = "two"
        return self.pair

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode != "two":
            return self.candidates[self.active](x)
        assert self.pair is not None and self.gates is not None, "call sample_pair() first"
        active, inactive = self.pair
        out = self.gates[active] * self.candidates[active](x)
        if inactive == active:
            return out
        # The inactive path only contributes dL/dg_inactive = <dL/dout, o_inactive>: its output is
        # kept, its graph is not.
        with torch.no_grad():
            other = self.candidates[inactive](x)
        return out + self.gates[inactive] * other

    # --- architecture gradient and rescaling -----------------------------------------------------
    def gate_grad(self) -> Tensor:
        """``dL/dg`` of the last architecture step (zeros where no gradient arrived)."""
        if self.gates is None or self.gates.grad is None:
            return torch.zeros_like(self.alpha)
        return self.gates.grad.detach()

    def accumulate_arch_grad(self, gate_grad: Tensor | None = None) -> None:
        """Add the two-path estimate of ``dL/dalpha`` to ``alpha.grad`` (on top of, e.g., the
        latency term's gradient that reached ``alpha`` directly through the expected cost)."""
        if self.mode != "two" or self.pair is None or self.pair[0] == self.pair[1]:
            return
        grad = two_path_alpha_grad(self.alpha, self.pair, self.gate_grad() if gate_grad is None else gate_grad)
        if self.alpha.grad is None:
            self.alpha.grad = grad.to(self.alpha.dtype)
        else:
            self.alpha.grad += grad.to(self.alpha.dtype)

    def rescale(self) -> None:
        """After the architecture optimizer step: keep the unsampled paths' probabilities."""
        if self.mode == "two" and self.pair is not None and self.pair[0] != self.pair[1]:
            rescale_pair_(self.alpha, self.pair, self._alpha_before)

    def release(self) -> None:
        """Drop the gates of the last architecture step (they hold no graph, only a small tensor)."""
        self.gates = None
        self._alpha_before = None


class AllPathsMixedOp(MixedOp):
    """DARTS-style mixed op: ``sum_i softmax(alpha)_i * o_i(x)``, every path in memory."""

    def __init__(self, candidates: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
        super().__init__(candidates, names)
        self.mode: Literal["all", "fixed"] = "all"

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fixed":
            return self.candidates[self.active](x)
        probs = self.probs()
        out = probs[0] * self.candidates[0](x)
        for i in range(1, self.num_candidates):
            out = out + probs[i] * self.candidates[i](x)
        return out
