"""The timm model factory: unknown names fail with a suggestion; output_stride keeps larger maps."""

from __future__ import annotations

import pytest
import torch

from lightning_nas.errors import RecipeError
from lightning_nas.tasks.models import timm_model


def test_output_stride_keeps_four_by_four_maps_on_cifar_inputs() -> None:
    x = torch.randn(2, 3, 32, 32)
    plain, dilated = timm_model("mobilenetv2_035"), timm_model("mobilenetv2_035", output_stride=8)
    assert plain.forward_features(x).shape[-2:] == (1, 1)
    assert dilated.forward_features(x).shape[-2:] == (4, 4)
    assert dilated(x).shape == (2, 10)


def test_unknown_architecture_names_the_key_and_a_close_match() -> None:
    with pytest.raises(RecipeError, match="task.model.arch") as error:
        timm_model("mobilenetv2_100x")
    assert "mobilenetv2_100" in str(error.value)
