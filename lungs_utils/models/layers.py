"""Small building blocks shared by the architectures in this package."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return ``conv`` rebuilt to take ``in_channels`` inputs (same kernel, stride, padding, bias ...).

    Used for the stems of torchvision models, which are built for RGB. The new convolution is
    freshly initialised (there are no pretrained weights to copy: training is from scratch).
    Returns ``conv`` itself when it already has ``in_channels``.
    """
    if conv.in_channels == in_channels:
        return conv
    if conv.groups != 1:
        raise ValueError("adapt_first_conv expects an ordinary (groups=1) stem convolution")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    # Same scheme torchvision uses for ResNet / MobileNet / EfficientNet convolutions.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias: BatchNorm follows) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def mlp_head(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Flatten, then Linear-ReLU-Dropout for each hidden width, then the class logits."""
    layers: list[nn.Module] = [nn.Flatten(1)]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """torchvision-style init for home-made models: He (fan-out) convs, BN at identity.

    Linear layers keep PyTorch's default, as torchvision's ResNet does.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
