"""VGG16 / VGG19 with residual stages, and VGG19 + an extra CNN block (the original ``vgg_cnn``).

Plain VGG trained from scratch on this data did not converge in the original project; a shortcut
around each stage's group of 3x3 convolutions (plus BatchNorm) fixed that. The 4096-wide FC layers
are replaced by global pooling and a small MLP: at 3 classes they were 100M+ parameters of waste.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn_relu, init_weights, mlp_head
from .registry import register

VGG_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG19_DEPTHS = (2, 2, 4, 4, 4)


class ResidualStage(nn.Module):
    """``depth`` conv3x3-BN(-ReLU) layers with one shortcut around the group, then 2x2 max-pool.

    The shortcut is the identity, or a 1x1 conv + BN where the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            c_in = in_channels if i == 0 else out_channels
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)]
            if i < depth - 1:  # the last ReLU comes after the sum, as in ResNet
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.body(x) + self.shortcut(x)))


class ResidualVGG(nn.Module):
    """VGG layout (stage depths as given, widths 64-128-256-512-512) built from :class:`ResidualStage`.

    ``extra_width``: if set, an extra conv-BN-ReLU x2 block of that width follows the features.
    """

    def __init__(
        self,
        depths: Sequence[int],
        num_classes: int = 3,
        in_channels: int = 1,
        widths: Sequence[int] = VGG_WIDTHS,
        extra_width: int | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c = in_channels
        for w, d in zip(widths, depths):
            stages.append(ResidualStage(c, w, d))
            c = w
        self.features = nn.Sequential(*stages)
        self.extra: nn.Module = nn.Identity()
        if extra_width is not None:
            self.extra = nn.Sequential(conv_bn_relu(c, extra_width), conv_bn_relu(extra_width, extra_width))
            c = extra_width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = mlp_head(c, (256,), num_classes, dropout)
        init_weights(self)
        # Each stage starts close to its shortcut, as with zero_init_residual in ResNets.
        for m in self.modules():
            if isinstance(m, ResidualStage):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.extra(self.features(x))))


@register("vgg16")
def vgg16(*, num_classes: int, in_channels: int, dropout: float = 0.5) -> nn.Module:
    """VGG16 layout (2,2,3,3,3 convs) with residual stages and BatchNorm."""
    return ResidualVGG(VGG16_DEPTHS, num_classes, in_channels, dropout=dropout)


@register("vgg19")
def vgg19(*, num_classes: int, in_channels: int, dropout: float = 0.5) -> nn.Module:
    """VGG19 layout (2,2,4,4,4 convs) with residual stages and BatchNorm."""
    return ResidualVGG(VGG19_DEPTHS, num_classes, in_channels, dropout=dropout)


@register("vgg_cnn")
def vgg_cnn(*, num_classes: int, in_channels: int, dropout: float = 0.5) -> nn.Module:
    """VGG19 residual features followed by an extra 512->256->256 conv block."""
    return ResidualVGG(VGG19_DEPTHS, num_classes, in_channels, extra_width=256, dropout=dropout)
