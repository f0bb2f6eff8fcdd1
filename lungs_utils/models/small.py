"""Small CPU-friendly networks: the original project's simple CNN and a tiny ResNet for the demo."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .layers import init_weights, mlp_head
from .registry import register


class SimpleCNN(nn.Module):
    """Four conv3x3-BN-maxpool-ReLU blocks, adaptive pool to a small grid, 3-layer MLP head.

    Pooling to a grid (not a single vector) keeps coarse position: where in the chest a finding
    sits (e.g. bilateral lower zones for COVID-19) is informative.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        grid: int = 4,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            # Max-pool before ReLU: same result (both monotone), 4x fewer ReLU elements.
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = mlp_head(c * grid * grid, (256, 64), num_classes, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class TinyResNet(nn.Module):
    """A narrow ResNet (BasicBlocks, widths 16-32-64-128, stride-2 stem, ~0.7M params).

    Meant for the CPU demo: trains on phantom data at 128 px in minutes. Total stride 16.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks: list[nn.Module] = []
            for j in range(d):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or c != w:
                    down = nn.Sequential(nn.Conv2d(c, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                blocks.append(BasicBlock(c, w, stride=stride, downsample=down))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)
        # Each residual block starts as identity (torchvision's zero_init_residual).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register("simple_cnn")
def simple_cnn(*, num_classes: int, in_channels: int, dropout: float = 0.3) -> nn.Module:
    """The original project's baseline CNN (~1.5M params)."""
    return SimpleCNN(num_classes, in_channels, dropout=dropout)


@register("resnet_tiny")
def resnet_tiny(*, num_classes: int, in_channels: int) -> nn.Module:
    """Tiny ResNet for CPU demos (~0.7M params)."""
    return TinyResNet(num_classes, in_channels)
