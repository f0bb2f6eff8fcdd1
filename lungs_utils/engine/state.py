"""What one :func:`~lungs_utils.engine.loop.fit` holds, shared with its callbacks: the loop's state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import unwrap
from .tasks import Task


@dataclass
class FitState:
    """Everything one :func:`fit` holds, shared with its callbacks (:mod:`lungs_utils.engine.callbacks`)."""

    params: Mapping[str, Any]
    task: Task
    model: nn.Module  # the plain (maybe compiled) module: validation, checkpoints
    net: nn.Module  # what the training step calls: the DDP wrapper under torchrun, else ``model``
    device: torch.device
    loader: torch.utils.data.DataLoader
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]
    dtype: torch.dtype | None = None
    mixer: Any = None
    #: The weights' exponential moving average (``ema`` > 0: a ``torch.optim.swa_utils.AveragedModel``).
    ema: Any = None
    rank: int = 0
    world: int = 1
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, Any] = field(default_factory=dict)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None  # the best weights of this call, in memory
    improved: bool = False
    validated: bool = False  # the last epoch was validated (``val_every``)
    stop: str | None = None  # set by a callback: why the loop ends now
    cut: str | None = None  # the time ran out (deadline.TIME_LIMIT or deadline.SIGTERM): training was cut short
    stopped_early: bool = False
    images_seen: int = 0
    train_seconds: float = 0.0
    checkpoints: dict[str, Path] = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint a resume continued from

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, kept as the best and predicted with: the moving average with
        ``ema``, else the model itself."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def end_epoch(self, row: dict[str, Any], val_metrics: dict[str, Any] | None) -> None:
        """Record a finished epoch: history row, and when it was validated (``val_metrics``), the validation
        metrics, best score and weights; an epoch without validation counts toward no patience."""
        self.epoch = row["epoch"]
        self.history.append(row)
        self.validated = val_metrics is not None
        self.improved = False
        if val_metrics is None:
            return
        self.val_metrics = val_metrics
        score = val_metrics[self.task.score]
        self.improved = score > self.best_score
        if self.improved:
            self.best_score, self.best_epoch, self.bad_epochs, self.best_metrics = score, self.epoch, 0, val_metrics
            self.best_state = {k: v.detach().clone() for k, v in self.evaluated.state_dict().items()}
        else:
            self.bad_epochs += 1
