"""What the loop optimises and how: the loss (label smoothing, class weights), the optimizer (no weight
decay on norms and biases) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import NUM_CLASSES


def make_optimizer(model: nn.Module, params: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD+Nesterov; no weight decay on norms and biases (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": params["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if params["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=params["lr"], momentum=params["momentum"], nesterov=True)
    if params["optimizer"] == "adam":
        # Adam's weight decay is L2 in the gradient (what the original project used).
        return torch.optim.Adam(groups, lr=params["lr"])
    return torch.optim.AdamW(groups, lr=params["lr"])


def make_scheduler(optimizer: torch.optim.Optimizer, params: Mapping[str, Any], steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: cosine with linear warm-up, one-cycle, or constant."""
    total = max(1, params["epochs"] * steps_per_epoch)
    if params["scheduler"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params["lr"], total_steps=total)
    if params["scheduler"] == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = min(int(params["warmup_epochs"] * steps_per_epoch), total - 1)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def class_weight_tensor(params: Mapping[str, Any], train_labels: np.ndarray) -> torch.Tensor | None:
    """Loss class weights: none, ``balanced`` (n / (C * count)) or an explicit list."""
    spec = params["class_weights"]
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(train_labels), minlength=NUM_CLASSES).astype(np.float64)
        weights = len(train_labels) / (NUM_CLASSES * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)
    return torch.tensor(spec, dtype=torch.float32)


def make_loss(params: Mapping[str, Any], train_labels: np.ndarray) -> nn.CrossEntropyLoss:
    """Cross-entropy with optional label smoothing and class weights (accepts soft targets for mixup)."""
    return nn.CrossEntropyLoss(weight=class_weight_tensor(params, train_labels),
                               label_smoothing=params["label_smoothing"])
