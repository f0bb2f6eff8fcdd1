"""The training loop: ``fit(model, train_ds, val_ds, params, run_dir)``.

Read as torchvision's reference trainer: :func:`start_fit` makes the choices params name (device,
seeds, memory format, compile, DDP, loader, loss, optimizer, schedule, precision); each epoch is
:func:`train_one_epoch` (data → augment → forward → loss → step, :func:`train_step`) and
:func:`evaluate` on the whole validation set (metrics from one confusion matrix, see
:mod:`lungs_utils.stats.metrics`); everything around the loop — checkpoints and exact resume, history,
early stopping, progress, log lines, TensorBoard — is a callback (:mod:`lungs_utils.engine.callbacks`),
and what the loop holds is its :class:`~lungs_utils.engine.state.FitState`. The task
(:mod:`lungs_utils.engine.tasks`: classification or lung masks) says how batches become inputs and
targets and which score picks the best epoch. With ``torch.distributed`` initialised (torchrun), the model
is wrapped in DistributedDataParallel, each rank sees its shard, and confusion matrices / losses are summed
across ranks so the metrics equal a single-process evaluation; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import LungsError
from ..progress import bar
from ..xrays import presets
from .callbacks import Callback, default_callbacks
from .checkpoint import unwrap
from .deadline import SIGTERM, TimeUp, sigterm_received
from .device import autocast_dtype, seed_everything, select_device
from .distributed import all_sum, rank_and_world
from .inference import infer
from .optim import make_optimizer, make_scheduler
from .schedule import train_size, validates
from .state import FitState
from .tasks import CLASSIFICATION, Classification, Task


@dataclass
class TrainResult:
    """What ``fit`` returns: the per-epoch history and the best epoch's validation metrics."""

    history: pd.DataFrame
    best_metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    train_images_per_s: float
    device: str
    checkpoints: dict[str, Path] = field(default_factory=dict)
    cut: str | None = None  # the time ran out before the last epoch (deadline.TIME_LIMIT or SIGTERM)


def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, params: Mapping[str, Any],
             device: torch.device, loss_fn: nn.Module | None = None, *, progress: bool = False,
             task: Task = CLASSIFICATION) -> tuple[float, dict[str, Any]]:
    """Loss and metrics over the whole dataset (every sample counted once, across ranks)."""
    rank, world = rank_and_world()
    meter = task.meter(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    loss_fn = loss_fn or task.make_loss(params, dataset)
    batches = infer(model, dataset, prepare=lambda x, y: task.eval_inputs(x, y, params), device=device,
                    batch_size=max(params["batch_size"], 64), channels_last=params["channels_last"],
                    autocast_dtype=autocast_dtype(device, params["precision"]),
                    # Shard without padding so no sample is counted twice.
                    sampler=range(rank, len(dataset), world) if world > 1 else None,
                    num_workers=params["num_workers"], progress=progress and rank == 0, desc="validate")
    for out, target, _ in batches:
        loss_sum += task.loss_sum(out, target, loss_fn)
        n += len(out)
        task.update(meter, out, target)
    all_sum(meter.counts)
    all_sum(loss_sum)
    all_sum(n)
    return float(loss_sum) / max(float(n), 1.0), task.metrics(meter)


def check_finite(loss_sum: float, epoch: int, params: Mapping[str, Any]) -> None:
    """Stop a run whose training loss became NaN or infinite: its weights are garbage from then on, so
    nothing more (no checkpoint of this epoch, no predictions, no submission) may come from them."""
    if math.isfinite(loss_sum):
        return
    kept = ("nothing was saved" if epoch <= 1 else
            f"the checkpoint of epoch {epoch - 1} is kept (checkpoints/last.pt)")
    raise LungsError(f"training diverged in epoch {epoch}: the loss became {loss_sum} (lr {params['lr']:g}, "
                     f"precision {params['precision']}); lower lr (e.g. -p lr={params['lr'] / 10:g}), add grad_clip, "
                     f"or use precision: fp32; {kept}")


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any], *,
               loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, mixer: Any = None,
               generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               task: Task = CLASSIFICATION) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch ``x`` (any device) with labels ``y`` (on the model's device):
    move, augment, mix, forward under autocast, backward, clip, step. Returns (loss, output, target for
    the metrics); the caller accumulates what it needs on the device (no sync)."""
    x, target = task.train_inputs(x.to(y.device, non_blocking=True), y, params, generator)
    fit_target = target
    if mixer is not None:
        x, fit_target = mixer(x, target)
    if params["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(y.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = net(x)
        loss = loss_fn(out.float(), fit_target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if params["grad_clip"]:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(net.parameters(), params["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return loss, out, target


def start_fit(model: nn.Module, train_ds: torch.utils.data.Dataset, params: Mapping[str, Any],
              task: Task = CLASSIFICATION) -> FitState:
    """Device, seeds, memory format, compile, DDP wrapper, loader, loss, optimizer, schedule, precision."""
    rank, world = rank_and_world()
    device = select_device(params["device"])
    seed_everything(params["seed"])
    model.to(device=device, memory_format=torch.channels_last if params["channels_last"] else torch.preserve_format)
    if params["compile"]:
        model = torch.compile(model)
    net: nn.Module = model
    if world > 1:
        # A model whose forward leaves parameters unused (e.g. the U-Net classifier's mask head) names
        # them in ``unused_in_forward``; DDP then skips them instead of waiting for their gradients.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(unwrap(model), "unused_in_forward", ())))
    # Own generators for everything random in the loop, saved in last.pt: a resumed process replays
    # them exactly. "workers" seeds DataLoader workers, which would otherwise draw from the global RNG.
    generators = {"loader": torch.Generator().manual_seed(params["seed"]),
                  "augment": torch.Generator().manual_seed(params["seed"] + 1),
                  "workers": torch.Generator().manual_seed(params["seed"] + 2)}
    if world > 1:
        sampler: Any = torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, shuffle=True,
                                                                       seed=params["seed"])
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=generators["loader"])
    per_rank = math.ceil(len(train_ds) / world)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=params["batch_size"], sampler=sampler, num_workers=params["num_workers"],
        pin_memory=device.type == "cuda", persistent_workers=params["num_workers"] > 0,
        generator=generators["workers"],
        # A lone last sample would break BatchNorm; drop only that case.
        drop_last=per_rank % params["batch_size"] == 1 and per_rank > 1)
    optimizer = make_optimizer(unwrap(model), params)
    dtype = autocast_dtype(device, params["precision"])
    ema = None
    if params.get("ema"):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # Buffers averaged too (use_buffers): the batch-norm statistics then match the averaged weights.
        ema = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(params["ema"]), use_buffers=True)
    return FitState(params=params, task=task, model=model, net=net, device=device, loader=loader,
                    loss_fn=task.make_loss(params, train_ds).to(device), optimizer=optimizer,
                    scheduler=make_scheduler(optimizer, params, max(1, len(loader))),
                    scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                    generators=generators, dtype=dtype, ema=ema,
                    mixer=presets.mix(params) if isinstance(task, Classification) else None, rank=rank, world=world)


def train_one_epoch(s: FitState, epoch: int, *, progress: bool = False) -> dict[str, Any]:
    """One pass over the training set (epoch is 0-based); returns the history row's training part."""
    if s.world > 1:
        s.loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    s.net.train()
    params = {**s.params, "image_size": train_size(s.params, epoch)}
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    meter = s.task.meter(s.device)
    n_seen = 0
    for x, y, _ in bar(s.loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or s.rank != 0):
        if s.world == 1 and sigterm_received():
            raise TimeUp(SIGTERM)  # the epoch in progress is dropped: last.pt holds the one before
        y = y.to(s.device, non_blocking=True)
        loss, out, target = train_step(s.net, x, y, params, loss_fn=s.loss_fn, optimizer=s.optimizer,
                                       scaler=s.scaler, scheduler=s.scheduler, mixer=s.mixer,
                                       generator=s.generators["augment"], dtype=s.dtype, task=s.task)
        if s.ema is not None:
            s.ema.update_parameters(unwrap(s.model))
        # Device-side bookkeeping only: no .item() (a sync) per batch.
        loss_sum += loss.detach().double() * y.shape[0]
        s.task.update(meter, out.detach(), target)
        n_seen += y.shape[0]
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    s.images_seen += n_seen * s.world
    s.train_seconds += seconds
    all_sum(meter.counts)
    all_sum(loss_sum)
    check_finite(float(loss_sum), epoch + 1, s.params)
    return {"epoch": epoch + 1, "lr": s.optimizer.param_groups[0]["lr"], "train_size": params["image_size"],
            "train_loss": float(loss_sum) / max(1, n_seen * s.world), **s.task.flat(s.task.metrics(meter), "train_"),
            "train_seconds": seconds, "images_per_s": n_seen * s.world / max(seconds, 1e-9)}


def fit(model: nn.Module, train_ds: torch.utils.data.Dataset, val_ds: torch.utils.data.Dataset,
        params: Mapping[str, Any], run_dir: str | os.PathLike[str] | None = None, *,
        progress: bool = True, stop_after: int | None = None, task: Task = CLASSIFICATION,
        callbacks: Sequence[Callback] | None = None, deadline: float | None = None,
        also: Sequence[Callback] = ()) -> TrainResult:
    """Train ``model`` and return its history; leaves the best epoch's weights in ``model``.

    Each epoch: :func:`train_one_epoch`, :func:`evaluate` on the whole validation set (every
    ``val_every``-th epoch and each of the last quarter: :func:`~lungs_utils.engine.schedule.validates`; with
    ``ema`` the weights' moving average is what is validated and kept), then the callbacks (:func:`lungs_utils.engine.callbacks.default_callbacks` unless given). With ``run_dir`` they write
    ``history.csv``, ``checkpoints/last.pt`` (full state, for exact resume with ``params['resume']``),
    ``checkpoints/best.pt`` (best validation ``task.score``: macro-F1, or Dice for lung masks) and
    TensorBoard logs in ``tb/``. ``stop_after`` ends this call after that many epochs (the schedule
    still spans ``params['epochs']``), for time-boxed sessions that resume later. ``deadline`` (a
    ``time.time()``) stops after the last epoch that ends before it, and SIGTERM (under
    :func:`lungs_utils.engine.deadline.sigterm_stops_training`) at once, dropping the epoch in progress;
    ``result.cut`` says so. ``also``: callbacks added to the default ones.
    """
    started = time.perf_counter()
    s = start_fit(model, train_ds, params, task)
    callbacks = default_callbacks(params, run_dir, progress=progress, stop_after=stop_after, deadline=deadline,
                                  also=also) if callbacks is None else list(callbacks)
    for callback in callbacks:
        callback.on_fit_start(s)
    for epoch in range(s.epoch, params["epochs"]):
        try:
            row = train_one_epoch(s, epoch, progress=progress)
        except TimeUp as up:
            s.stop = s.cut = str(up)
            break
        if validates(params, epoch + 1):
            t1 = time.perf_counter()
            # The plain module, not the DDP wrapper: DDP's per-forward buffer broadcast would deadlock
            # when ranks hold different numbers of validation batches.
            val_loss, val_metrics = evaluate(s.evaluated, val_ds, params, s.device, s.loss_fn, progress=progress,
                                             task=task)
            s.end_epoch({**row, "val_loss": val_loss, **task.flat(val_metrics, "val_"),
                         "val_seconds": time.perf_counter() - t1}, val_metrics)
        else:
            s.end_epoch(row, None)
        for callback in callbacks:
            callback.on_epoch_end(s)
        if s.stop:
            break
    for callback in callbacks:
        callback.on_fit_end(s)
    if s.best_state is not None:  # the best epoch's weights, whatever epoch training ended on
        unwrap(s.model).load_state_dict(s.best_state)
    return TrainResult(pd.DataFrame(s.history), s.best_metrics, s.best_epoch, len(s.history), s.stopped_early,
                       time.perf_counter() - started,
                       s.images_seen / s.train_seconds if s.train_seconds else 0.0, str(s.device), s.checkpoints,
                       s.cut)
