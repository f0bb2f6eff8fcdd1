"""Classification models, found by name through a registry (timm style).

>>> from lungs_utils import models
>>> model = models.build("resnet18", num_classes=3, in_channels=1)
>>> models.names()          # every valid name
>>> models.describe("unet") # {'name', 'params', 'flops'} at 256 px
>>> models.for_params(params) # the network a run's params ask for (classifier or mask-only U-Net)

Every model accepts any input size (adaptive pooling) and ``in_channels`` (1 = grayscale X-ray,
2 = X-ray + lung mask), is randomly initialised (no pretrained weights: the competition forbids
them) and returns logits ``(N, num_classes)``.

The seven architectures the original project compared: ``simple_cnn``, ``resnet34``, ``unet``
(also segments: ``model.segment(x)``), ``mobilenet_v2``, ``vgg16``, ``vgg19`` (residual stages +
BatchNorm) and ``vgg_cnn`` (VGG19 features + an extra CNN block). Added: ``resnet18`` and
``efficientnet_b0`` (torchvision), and ``resnet_tiny`` for CPU demos.

Importing registers the architectures below and does nothing else.
"""

from __future__ import annotations

# Importing the architecture modules fills the registry (their @register decorators).
from . import small, tv, unet, vgg  # noqa: F401
from .build import for_params, segmenter
from .layers import adapt_first_conv
from .registry import build, describe, names, options, register, summary_table
from .unet import UNet

ORIGINAL_MODELS: tuple[str, ...] = ("simple_cnn", "resnet34", "unet", "mobilenet_v2", "vgg16", "vgg19", "vgg_cnn")

__all__ = [
    "ORIGINAL_MODELS",
    "UNet",
    "adapt_first_conv",
    "build",
    "describe",
    "for_params",
    "names",
    "options",
    "register",
    "segmenter",
    "summary_table",
]
