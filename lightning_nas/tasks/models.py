"""Fixed networks a task can train (registered under ``model``)."""

from __future__ import annotations

from torch import nn


def timm_model(arch: str, num_classes: int = 10, drop_rate: float = 0.0, pretrained: bool = False,
               output_stride: int | None = None) -> nn.Module:
    """A timm architecture by name (``mobilenetv2_100``, ``resnet18``...); random init by default.

    ``output_stride`` (8 or 16) replaces the last strides by dilation, timm's way of keeping larger
    feature maps: ImageNet layouts otherwise end at 1x1 maps on 32x32 inputs."""
    import timm

    if arch not in timm.list_models():
        from ..errors import RecipeError, close_match

        raise RecipeError("unknown timm architecture", key="task.model.arch", given=arch,
                          allowed="a name from timm.list_models()", suggestion=close_match(arch, timm.list_models()))
    extra = {} if output_stride is None else {"output_stride": output_stride}
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **extra)
