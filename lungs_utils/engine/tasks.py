"""What the loop needs to know about a learning problem: classification (the default) and lung segmentation.

A task turns a uint8 batch into (network input, target), builds the loss, and keeps the metrics: a meter
with an additive ``counts`` tensor (summed across DDP ranks) and ``metrics()`` from it. The loop,
checkpoints, resume and history are shared by every task (:func:`lungs_utils.engine.loop.fit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params import is_segmentation
from ..stats.metrics import ConfusionMatrix, MaskOverlap, flat, from_confusion
from ..xrays import presets
from ..xrays.masks import THRESHOLD
from .optim import make_loss


class Task:
    """What the loop needs to know about a learning problem; :class:`Classification` is the default.

    A task turns a uint8 batch into (network input, target), builds the loss, and keeps the metrics:
    a meter with an additive ``counts`` tensor (summed across DDP ranks) and ``metrics()`` from it.
    ``score`` names the validation metric that picks the best checkpoint and drives early stopping.
    The loop, checkpoints, resume and history are shared by every task (see :func:`fit`).
    """

    score = "macro_f1"
    score_label = "macro-F1"  # the score as people read it

    def make_loss(self, params: Mapping[str, Any], train_ds: torch.utils.data.Dataset) -> nn.Module:
        raise NotImplementedError

    def train_inputs(self, x: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any],
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented input and target of a training batch (``x`` already on the device)."""
        raise NotImplementedError

    def eval_inputs(self, x: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def meter(self, device: torch.device) -> Any:
        raise NotImplementedError

    def update(self, meter: Any, out: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def metrics(self, meter: Any) -> dict[str, Any]:
        raise NotImplementedError

    def loss_sum(self, out: torch.Tensor, target: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        """The batch's loss summed over its items (so an epoch's mean is exact across batches and ranks)."""
        raise NotImplementedError

    def flat(self, metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
        """The scalar metrics for a history row."""
        return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


class Classification(Task):
    """Three-class classification: cross-entropy, macro-F1 from one confusion matrix."""

    score = "macro_f1"

    def make_loss(self, params: Mapping[str, Any], train_ds: torch.utils.data.Dataset) -> nn.Module:
        labels = getattr(train_ds, "labels", None)
        return make_loss(params, labels if labels is not None else np.zeros(0, np.int64))

    def train_inputs(self, x, y, params, generator):
        return presets.train_batch(x, params, generator), y

    def eval_inputs(self, x, y, params):
        return presets.to_input(x, params["image_size"], masks=params["masks"], histeq=params["histeq"]), y

    def meter(self, device: torch.device) -> ConfusionMatrix:
        return ConfusionMatrix(device=device)

    def update(self, meter: ConfusionMatrix, out: torch.Tensor, target: torch.Tensor) -> None:
        meter.update(target, out.argmax(dim=1))

    def metrics(self, meter: ConfusionMatrix) -> dict[str, Any]:
        return from_confusion(meter.matrix())

    def loss_sum(self, out, target, loss_fn):
        return nn.functional.cross_entropy(out.float(), target, weight=getattr(loss_fn, "weight", None),
                                           reduction="sum")

    def flat(self, metrics, prefix):
        return flat(metrics, prefix)


CLASSIFICATION = Classification()


# ------------------------------------------------------------------------------------------------ lung masks
class DiceBCELoss(nn.Module):
    """Mean over images of binary cross-entropy plus (1 - soft Dice), on mask logits.

    BCE gives every pixel a gradient from the first step; the Dice term weighs the lungs against the
    background whatever their share of the image. Per-image terms, so ``reduction="sum"`` adds up
    exactly across batches.
    """

    def __init__(self, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.smooth = bce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits, target = logits.float().flatten(1), target.float().flatten(1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dim=1)
        dice = (2 * inter + self.smooth) / (prob.sum(dim=1) + target.sum(dim=1) + self.smooth)
        per_image = self.bce_weight * bce + (1 - dice)
        return per_image.sum() if reduction == "sum" else per_image.mean()


class Segmentation(Task):
    """Lung masks: 2-channel uint8 batches (image, mask) → image input and binary mask target."""

    score = "dice"
    score_label = "Dice"

    def make_loss(self, params: Mapping[str, Any], train_ds: torch.utils.data.Dataset) -> nn.Module:
        return DiceBCELoss()

    @staticmethod
    def _split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Resizing blurs the mask channel; the target is the binary mask at the input's size.
        return z[:, :1], (z[:, 1:2] > THRESHOLD).to(z.dtype)

    def train_inputs(self, x, y, params, generator):
        return self._split(presets.train_batch(x, params, generator, masks="channel"))

    def eval_inputs(self, x, y, params):
        return self._split(presets.to_input(x, params["image_size"], masks="channel", histeq=params["histeq"]))

    def meter(self, device: torch.device) -> MaskOverlap:
        return MaskOverlap(device)

    def update(self, meter: MaskOverlap, out: torch.Tensor, target: torch.Tensor) -> None:
        meter.update(target, out > 0)  # logit > 0 ⇔ probability > 0.5

    def metrics(self, meter: MaskOverlap) -> dict[str, Any]:
        return meter.metrics()

    def loss_sum(self, out, target, loss_fn):
        return loss_fn(out, target, reduction="sum")


SEGMENTATION = Segmentation()


def task_for(params: Mapping[str, Any]) -> Task:
    """The task a run's params describe: lung segmentation for its notebook, else classification."""
    return SEGMENTATION if is_segmentation(params) else CLASSIFICATION
