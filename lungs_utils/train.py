"""The training loop: ``fit(model, train_ds, val_ds, params, run_dir)``.

Read as torchvision's reference trainer: :func:`start_fit` makes the choices params name (device,
seeds, memory format, compile, DDP, loader, loss, optimizer, schedule, precision); each epoch is
:func:`train_one_epoch` (data → augment → forward → loss → step, :func:`train_step`) and
:func:`evaluate` on the whole validation set (metrics from one confusion matrix, see
:mod:`lungs_utils.metrics`); everything around the loop — checkpoints and exact resume, history, early
stopping, progress, log lines, TensorBoard — is a callback (:mod:`lungs_utils.callbacks`). With
``torch.distributed`` initialised (torchrun), the model is wrapped in DistributedDataParallel, each rank
sees its shard, and confusion matrices / losses are summed across ranks so the metrics equal a
single-process evaluation; only rank 0 writes files.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from . import NUM_CLASSES, hardware, presets
# Torch-free (the Kaggle estimate needs it without PyTorch); re-exported for the loop's callers.
from .schedule import RAMP_SHARE, SIZE_STEP, train_size  # noqa: F401
from .callbacks import Callback, default_callbacks
# check_resume and load_checkpoint are re-exported: callers (experiment, segmentation, runner, docs
# scripts, notebooks' users) import them from here.
from .checkpoint import check_resume, load_checkpoint, load_weights, unwrap  # noqa: F401
from .errors import LungsError
from .inference import infer
from .metrics import ConfusionMatrix, flat, from_confusion
from .progress import bar


# ------------------------------------------------------------------------------------------------ setup
def select_device(name: str = "auto") -> torch.device:
    """``auto`` → the local CUDA device when present (per-rank under torchrun), else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise LungsError("device: cuda was requested but no CUDA GPU is visible; use device: auto or cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True where the convolutions get bf16 instructions (AVX512-BF16 or AMX, and not capped below them
    by ``ONEDNN_MAX_CPU_ISA``): there bf16 autocast is ~1.5x fp32; elsewhere bf16 is emulated and ~10x
    slower (measured: 15 vs 162 img/s under an AVX2 cap). :mod:`lungs_utils.hardware` reads the CPU and
    the cap; without /proc/cpuinfo, torch's own probes decide."""
    kind = hardware.cpu_kind()
    if kind["isa"] != hardware.UNKNOWN:
        return kind["bf16"]
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)  # private probes: absent in some torch builds
        try:
            if probe is not None and probe():
                return True
        except Exception:  # noqa: BLE001 - a failed probe means "don't rely on it"
            pass
    return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device, or None for fp32.

    ``auto``: bf16 on CUDA GPUs that support it, fp16 on older ones; on a CPU bf16 where it has bf16
    instructions (measured on a small real mixed-source X-ray set, not in the repository, with
    params/cpu_small.yaml, two seeds: test macro-F1
    0.918 / 0.903 in bf16 vs 0.931 / 0.903 in fp32, i.e. within one of 76 images, in 150 s instead of
    254-280 s), else fp32. ``fp32`` turns autocast off anywhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


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


# ------------------------------------------------------------------------------------------------ loop
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


class Task:
    """What the loop needs to know about a learning problem; :class:`Classification` is the default.

    A task turns a uint8 batch into (network input, target), builds the loss, and keeps the metrics:
    a meter with an additive ``counts`` tensor (summed across DDP ranks) and ``metrics()`` from it.
    ``score`` names the validation metric that picks the best checkpoint and drives early stopping.
    The loop, checkpoints, resume and history are shared by every task (see :func:`fit`).
    """

    score = "macro_f1"

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


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the one process that writes the run folder."""
    return _distributed()[0] == 0


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, params: Mapping[str, Any],
             device: torch.device, loss_fn: nn.Module | None = None, *, progress: bool = False,
             task: Task = CLASSIFICATION) -> tuple[float, dict[str, Any]]:
    """Loss and metrics over the whole dataset (every sample counted once, across ranks)."""
    rank, world = _distributed()
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
    _all_sum(meter.counts)
    _all_sum(loss_sum)
    _all_sum(n)
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


@dataclass
class FitState:
    """Everything one :func:`fit` holds, shared with its callbacks (:mod:`lungs_utils.callbacks`)."""

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
    stop: str | None = None  # set by a callback: why the loop ends now
    stopped_early: bool = False
    images_seen: int = 0
    train_seconds: float = 0.0
    checkpoints: dict[str, Path] = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint a resume continued from

    def end_epoch(self, row: dict[str, Any], val_metrics: dict[str, Any]) -> None:
        """Record a finished epoch: history row, validation metrics, best score and weights."""
        self.epoch, self.val_metrics = row["epoch"], val_metrics
        self.history.append(row)
        score = val_metrics[self.task.score]
        self.improved = score > self.best_score
        if self.improved:
            self.best_score, self.best_epoch, self.bad_epochs, self.best_metrics = score, self.epoch, 0, val_metrics
            self.best_state = {k: v.detach().clone() for k, v in unwrap(self.model).state_dict().items()}
        else:
            self.bad_epochs += 1


def start_fit(model: nn.Module, train_ds: torch.utils.data.Dataset, params: Mapping[str, Any],
              task: Task = CLASSIFICATION) -> FitState:
    """Device, seeds, memory format, compile, DDP wrapper, loader, loss, optimizer, schedule, precision."""
    rank, world = _distributed()
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
    return FitState(params=params, task=task, model=model, net=net, device=device, loader=loader,
                    loss_fn=task.make_loss(params, train_ds).to(device), optimizer=optimizer,
                    scheduler=make_scheduler(optimizer, params, max(1, len(loader))),
                    scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                    generators=generators, dtype=dtype,
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
        y = y.to(s.device, non_blocking=True)
        loss, out, target = train_step(s.net, x, y, params, loss_fn=s.loss_fn, optimizer=s.optimizer,
                                       scaler=s.scaler, scheduler=s.scheduler, mixer=s.mixer,
                                       generator=s.generators["augment"], dtype=s.dtype, task=s.task)
        # Device-side bookkeeping only: no .item() (a sync) per batch.
        loss_sum += loss.detach().double() * y.shape[0]
        s.task.update(meter, out.detach(), target)
        n_seen += y.shape[0]
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    s.images_seen += n_seen * s.world
    s.train_seconds += seconds
    _all_sum(meter.counts)
    _all_sum(loss_sum)
    check_finite(float(loss_sum), epoch + 1, s.params)
    return {"epoch": epoch + 1, "lr": s.optimizer.param_groups[0]["lr"], "train_size": params["image_size"],
            "train_loss": float(loss_sum) / max(1, n_seen * s.world), **s.task.flat(s.task.metrics(meter), "train_"),
            "train_seconds": seconds, "images_per_s": n_seen * s.world / max(seconds, 1e-9)}


def fit(model: nn.Module, train_ds: torch.utils.data.Dataset, val_ds: torch.utils.data.Dataset,
        params: Mapping[str, Any], run_dir: str | os.PathLike[str] | None = None, *,
        progress: bool = True, stop_after: int | None = None, task: Task = CLASSIFICATION,
        callbacks: Sequence[Callback] | None = None) -> TrainResult:
    """Train ``model`` and return its history; leaves the best epoch's weights in ``model``.

    Each epoch: :func:`train_one_epoch`, :func:`evaluate` on the whole validation set, then the
    callbacks (:func:`lungs_utils.callbacks.default_callbacks` unless given). With ``run_dir`` they write
    ``history.csv``, ``checkpoints/last.pt`` (full state, for exact resume with ``params['resume']``),
    ``checkpoints/best.pt`` (best validation ``task.score``: macro-F1, or Dice for lung masks) and
    TensorBoard logs in ``tb/``. ``stop_after`` ends this call after that many epochs (the schedule
    still spans ``params['epochs']``), for time-boxed sessions that resume later.
    """
    started = time.perf_counter()
    s = start_fit(model, train_ds, params, task)
    callbacks = default_callbacks(params, run_dir, progress=progress, stop_after=stop_after) \
        if callbacks is None else list(callbacks)
    for callback in callbacks:
        callback.on_fit_start(s)
    for epoch in range(s.epoch, params["epochs"]):
        row = train_one_epoch(s, epoch, progress=progress)
        t1 = time.perf_counter()
        # The plain module, not the DDP wrapper: DDP's per-forward buffer broadcast would deadlock
        # when ranks hold different numbers of validation batches.
        val_loss, val_metrics = evaluate(s.model, val_ds, params, s.device, s.loss_fn, progress=progress, task=task)
        s.end_epoch({**row, "val_loss": val_loss, **task.flat(val_metrics, "val_"),
                     "val_seconds": time.perf_counter() - t1}, val_metrics)
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
                       s.images_seen / s.train_seconds if s.train_seconds else 0.0, str(s.device), s.checkpoints)
