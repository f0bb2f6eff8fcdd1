"""U-Net used as a classifier, with a segmentation head for the lung masks.

``forward(x)`` returns class logits ``(N, num_classes)`` from the globally pooled bottleneck and
last decoder map. ``segment(x)`` returns lung-mask logits ``(N, 1, H, W)`` (apply a sigmoid; train
with ``BCEWithLogitsLoss`` against the competition's ``train_lung_masks``). ``classify_and_segment``
gives both from one pass, for multi-task training.

Note for DistributedDataParallel: ``forward`` does not use the mask head, which the model says in
``unused_in_forward``; ``train.fit`` then wraps it with ``find_unused_parameters=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn_relu, init_weights, mlp_head
from .registry import register


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


class UNet(nn.Module):
    """U-Net (``depth`` down levels, widths ``base * 2**i``) with class and mask heads.

    Any input size works: where a level's size is odd, the upsampled map is zero-padded by the
    missing row/column before it is joined with the skip connection.
    """

    def __init__(
        self, num_classes: int = 3, in_channels: int = 1, base: int = 32, depth: int = 4, dropout: float = 0.3,
        mask_only: bool = False,
    ) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]  # e.g. 32, 64, 128, 256, 512
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(
            [double_conv(in_channels, widths[0])] + [double_conv(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decode = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.mask_head = nn.Conv2d(widths[0], 1, 1)
        # A mask-only U-Net has no class head, so every parameter gets a gradient (DDP needs that).
        self.mask_only = mask_only
        self.head = None if mask_only else mlp_head(widths[-1] + widths[0], (256,), num_classes, dropout)
        # The classifier's forward leaves the mask head (for .segment()) without a gradient; DDP must know.
        self.unused_in_forward = () if mask_only else ("mask_head",)
        init_weights(self)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(bottleneck, last decoder map)``; the latter is at the input's resolution."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        bottleneck = y = skips.pop()
        for up, decode in zip(self.up, self.decode):
            skip = skips.pop()
            y = up(y)
            # Pooling floors odd sizes, so the upsampled map can be one row/column short.
            dh, dw = skip.shape[-2] - y.shape[-2], skip.shape[-1] - y.shape[-1]
            if dh or dw:
                y = F.pad(y, (0, dw, 0, dh))
            y = decode(torch.cat([skip, y], dim=1))
        return bottleneck, y

    def _classify(self, bottleneck: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        pooled = [torch.flatten(F.adaptive_avg_pool2d(t, 1), 1) for t in (bottleneck, decoded)]
        return self.head(torch.cat(pooled, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``; mask logits ``(N, 1, H, W)`` for a ``mask_only`` U-Net."""
        if self.mask_only:
            return self.segment(x)
        return self._classify(*self.features(x))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Lung-mask logits ``(N, 1, H, W)`` at the input's size."""
        return self.mask_head(self.features(x)[1])

    def classify_and_segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and mask logits from a single pass."""
        if self.mask_only:
            raise ValueError("this U-Net was built with mask_only=True: it has no class head")
        bottleneck, decoded = self.features(x)
        return self._classify(bottleneck, decoded), self.mask_head(decoded)


@register("unet")
def unet(*, num_classes: int, in_channels: int, base: int = 32, dropout: float = 0.3,
         mask_only: bool = False) -> nn.Module:
    """U-Net classifier (4 levels, base 32); ``.segment(x)`` gives lung-mask logits."""
    return UNet(num_classes, in_channels, base=base, dropout=dropout, mask_only=mask_only)


@register("unet_small")
def unet_small(*, num_classes: int, in_channels: int, dropout: float = 0.3, mask_only: bool = False) -> nn.Module:
    """U-Net with a quarter of the width (base 8, 4 levels): lung masks on a CPU in minutes."""
    return UNet(num_classes, in_channels, base=8, dropout=dropout, mask_only=mask_only)
