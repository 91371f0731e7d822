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

from ..errors import RecipeError
from ..nn.safe_load import load_torch_file, require_mapping


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


PREDICTOR_FILE_DESCRIPTION = "a predictor.pt written by `lightning-nas fit` of a predictor recipe (spec, state_dict)"


def _read_predictor_file(path: str | Path, key: str | None) -> dict[str, Any]:
    return require_mapping(load_torch_file(path, key=key, what=PREDICTOR_FILE_DESCRIPTION), ("spec", "state_dict"),
                           path=path, key=key, what=PREDICTOR_FILE_DESCRIPTION)


def predictor_target(path: str | Path, key: str | None = None) -> str | None:
    """The deployment target of the quantized pairs a predictor file was trained on (or None)."""
    return _read_predictor_file(path, key).get("target")


def load_predictor(path: str | Path, key: str | None = None) -> AccuracyPredictor:
    """A predictor from its spec and state dict (read without pickle); ``key`` names the recipe key
    that gave ``path`` in the errors."""
    saved = _read_predictor_file(path, key)
    spec = saved["spec"]
    expected = {"arch_features", "hidden", "layers"}
    if not isinstance(spec, dict) or not expected <= set(spec) or not set(spec) <= expected | {"policy_features"}:
        raise RecipeError("the predictor spec is not one this version builds", key=key, given=str(path),
                          allowed=f"a spec with {', '.join(sorted(expected))} (and policy_features)")
    predictor = QuantAccuracyPredictor(**spec) if "policy_features" in spec else AccuracyPredictor(**spec)
    try:
        predictor.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise RecipeError(f"the predictor's weights do not fit its spec ({str(error).splitlines()[0]})", key=key,
                          given=str(path)) from None
    return predictor
