"""CIFAR ResNets (He et al., 2016, section 4.2): ResNet-20/32/44/56 for 32x32 images.

A 3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks at widths ``w, 2w, 4w`` (strides 1, 2,
2), global pooling and a linear classifier. Shortcuts that change the shape are the paper's option
A: a stride-2 subsampling with zero-padded channels, so they have no weights and every weight layer
sits on the main path. ResNet-20 thus has 18 convolutions inside its blocks (the layers a
mixed-precision policy chooses bits for), plus the stem and the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and pad the new channels with zeros."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        shape_changes = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = _PadShortcut(stride, out_channels - in_channels) if shape_changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, channels = [], width
        for index, stride in enumerate((1, 2, 2)):
            out_channels = width * 2**index
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(channels, out_channels, stride if b == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def block_layers(self) -> list[str]:
        """Qualified names of the convolutions inside the residual blocks, in forward order."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("layer")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int = 20, width: int = 16, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of ``depth`` (6n + 2) layers with stem width ``width``."""
    return CifarResNet(depth, width, num_classes)
