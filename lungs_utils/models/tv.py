"""torchvision architectures, randomly initialised (``weights=None``) with the stem adapted to grayscale."""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from .layers import adapt_first_conv
from .registry import register


@register("resnet18")
def resnet18(*, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18; last BN of each block zero-initialised."""
    model = tvm.resnet18(weights=None, num_classes=num_classes, zero_init_residual=True)
    model.conv1 = adapt_first_conv(model.conv1, in_channels)
    return model


@register("resnet34")
def resnet34(*, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-34 (an original-project model); last BN of each block zero-initialised."""
    model = tvm.resnet34(weights=None, num_classes=num_classes, zero_init_residual=True)
    model.conv1 = adapt_first_conv(model.conv1, in_channels)
    return model


@register("mobilenet_v2")
def mobilenet_v2(*, num_classes: int, in_channels: int, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNetV2 (an original-project model)."""
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, dropout=dropout)
    model.features[0][0] = adapt_first_conv(model.features[0][0], in_channels)
    return model


@register("efficientnet_b0")
def efficientnet_b0(
    *, num_classes: int, in_channels: int, dropout: float = 0.2, stochastic_depth_prob: float = 0.2
) -> nn.Module:
    """torchvision EfficientNet-B0."""
    model = tvm.efficientnet_b0(
        weights=None, num_classes=num_classes, dropout=dropout, stochastic_depth_prob=stochastic_depth_prob
    )
    model.features[0][0] = adapt_first_conv(model.features[0][0], in_channels)
    return model
