"""NAS-Bench-201 network: the fixed macro skeleton filled with one searched cell.

Skeleton (as in the benchmark, so parameter counts match the published ones):
stem 3x3 conv (C) + BN; three stages of ``N`` cells at C, 2C, 4C channels, separated by residual
reduction blocks (stride-2 basic block, shortcut avg-pool + 1x1 conv); BN-ReLU, global average
pool, linear classifier.

Module names are stable and mirror :func:`lightning_nas.spaces.nb201.weight_slot_names`, which
lets node-wise statistics be aligned across architectures by name.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_nas.spaces.nb201 import NUM_NODES, parse_arch


class ReLUConvBN(nn.Module):
    """ReLU -> Conv -> BN; ``op.1`` is the conv, which is the name weight slots refer to."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The ``none`` op: an edge that carries nothing (output is zeros of the input's shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying keeps the result attached to the graph and on the right device / dtype.
        return x.mul(0.0)


def make_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3, 1)
    if name == "avg_pool_3x3":
        # Inside a cell C_in == C_out, so the benchmark's pooling op has no preprocessing conv.
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"unknown NAS-Bench-201 operation {name!r}")


class NB201Cell(nn.Module):
    """Searched cell: node j = sum over i < j of edge_(j,i)(node i); output is the last node."""

    def __init__(self, ops: tuple[str, ...], channels: int) -> None:
        super().__init__()
        self.ops = ops
        self.edges = nn.ModuleList(make_op(op, channels) for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        k = 0
        for j in range(1, NUM_NODES):
            total = None
            for i in range(j):
                out = self.edges[k](nodes[i])
                total = out if total is None else total + out
                k += 1
            nodes.append(total)
        return nodes[-1]


class ResidualReduction(nn.Module):
    """Stride-2 basic residual block between stages (ReLU-Conv-BN x2, avg-pool + 1x1 conv shortcut)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    def __init__(self, arch: str, num_classes: int = 10, init_channels: int = 16, cells_per_stage: int = 5) -> None:
        super().__init__()
        self.arch = arch
        self.genotype = parse_arch(arch)
        c = init_channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        cells: list[nn.Module] = []
        for stage in range(3):
            width = c * 2**stage
            if stage > 0:
                cells.append(ResidualReduction(width // 2, width))
            cells.extend(NB201Cell(self.genotype, width) for _ in range(cells_per_stage))
        self.cells = nn.ModuleList(cells)
        out_channels = c * 4
        self.lastact = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        x = self.global_pooling(self.lastact(x)).flatten(1)
        return self.classifier(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
