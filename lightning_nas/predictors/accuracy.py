"""Accuracy predictors: an MLP on the space's encoding, and its quantization-aware extension.

The full-precision predictor maps an architecture encoding to top-1 through ``layers`` hidden
layers, plus a frozen bias equal to the mean accuracy of its training pairs (so the network
only learns differences). The quantization-aware predictor adds a branch for the policy
encoding whose output is added to the first hidden layer; with predictor transfer it inherits
every other weight from a trained full-precision predictor and starts with a zero policy
branch, i.e. exactly the full-precision prediction, which few quantized pairs then correct.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class AccuracyPredictor(nn.Module):
    def __init__(self, arch_features: int, hidden: int = 400, layers: int = 3, base_accuracy: float = 0.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.arch_features, self.hidden, self.layers = arch_features, hidden, layers
        self.first = nn.Linear(arch_features, hidden)
        body: list[nn.Module] = [nn.ReLU()]
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), nn.ReLU()]
        body.append(nn.Linear(hidden, 1))
        self.rest = nn.Sequential(*body)
        self.register_buffer("base_accuracy", torch.tensor(float(base_accuracy)))

    def features(self, arch: Tensor, policy: Tensor | None = None) -> Tensor:
        return self.first(arch)

    def forward(self, arch: Tensor, policy: Tensor | None = None) -> Tensor:
        return self.rest(self.features(arch, policy)).squeeze(-1) + self.base_accuracy

    def spec(self) -> dict[str, Any]:
        return {"arch_features": self.arch_features, "hidden": self.hidden, "layers": self.layers}


class QuantAccuracyPredictor(AccuracyPredictor):
    def __init__(self, arch_features: int, policy_features: int, hidden: int = 400, layers: int = 3,
                 base_accuracy: float = 0.0) -> None:
        super().__init__(arch_features, hidden, layers, base_accuracy)
        self.policy_features = policy_features
        self.policy_branch = nn.Linear(policy_features, hidden)

    def features(self, arch: Tensor, policy: Tensor | None = None) -> Tensor:
        if policy is None:
            raise ValueError("the quantization-aware predictor needs a policy encoding")
        return self.first(arch) + self.policy_branch(policy)

    @torch.no_grad()
    def inherit(self, full_precision: AccuracyPredictor) -> None:
        """Predictor transfer: copy every shared weight, zero the policy branch."""
        if (full_precision.arch_features, full_precision.hidden, full_precision.layers) != (
                self.arch_features, self.hidden, self.layers):
            raise ValueError(f"cannot transfer from a predictor of shape {full_precision.spec()} into "
                             f"{self.spec()}: the encodings or hidden sizes differ")
        self.first.load_state_dict(full_precision.first.state_dict())
        self.rest.load_state_dict(full_precision.rest.state_dict())
        self.base_accuracy.copy_(full_precision.base_accuracy)
        nn.init.zeros_(self.policy_branch.weight)
        nn.init.zeros_(self.policy_branch.bias)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "policy_features": self.policy_features}


def save_predictor(predictor: AccuracyPredictor, path: str | Path, **extra: Any) -> None:
    from ..files import replacing

    with replacing(path) as temporary:
        torch.save({"spec": predictor.spec(), "state_dict": predictor.state_dict(), **extra}, temporary)


def load_predictor(path: str | Path) -> AccuracyPredictor:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    spec = saved["spec"]
    predictor = QuantAccuracyPredictor(**spec) if "policy_features" in spec else AccuracyPredictor(**spec)
    predictor.load_state_dict(saved["state_dict"])
    return predictor
