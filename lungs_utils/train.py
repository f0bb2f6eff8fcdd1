"""The training loop: ``fit(model, train_ds, val_ds, params, run_dir)``.

One readable loop (data → augment → forward → loss → step), with the choices made by params:
optimizer, loss, schedule, precision, memory format, compile, early stopping, checkpoints and exact
resume. Validation runs on the whole validation set every epoch; metrics come from one confusion matrix
(see :mod:`lungs_utils.metrics`). With ``torch.distributed`` initialised (torchrun), the model is wrapped
in DistributedDataParallel, each rank sees its shard, and confusion matrices / losses are summed across
ranks so the metrics equal a single-process evaluation; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from . import NUM_CLASSES, presets
from .errors import LungsError
from .io import atomic_path, atomic_write_csv
from .metrics import ConfusionMatrix, flat, from_confusion
from .progress import bar

CHECKPOINT_FORMAT = "lungs-checkpoint-1"


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
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is ~1.7x fp32."""
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


#: Progressive resizing reaches the full ``image_size`` after this share of the epochs.
RAMP_SHARE = 0.7
#: Training sizes are multiples of this (few distinct shapes: kernels and caches are reused).
SIZE_STEP = 16


def train_size(params: Mapping[str, Any], epoch: int) -> int:
    """The training image side in ``epoch`` (0-based): ``image_size``, or with ``start_size`` a linear
    ramp from it to ``image_size`` over the first :data:`RAMP_SHARE` of the epochs, rounded down to a
    multiple of :data:`SIZE_STEP` (never below ``start_size``). Early epochs on smaller images cost less,
    so the same minutes buy more epochs (fast.ai's progressive resizing)."""
    full, start = params["image_size"], params["start_size"]
    if not start or start >= full:
        return full
    ramp = max(1.0, RAMP_SHARE * params["epochs"])
    size = start + (full - start) * min(1.0, epoch / ramp)
    return full if size >= full else max(start, int(size) // SIZE_STEP * SIZE_STEP)


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


# ------------------------------------------------------------------------------------------------ checkpoints
def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for key, g in generators.items():
        if key in state["generators"]:  # checkpoints of older versions lack newer generators
            g.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill leaves the old or the new file."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a lungs checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise LungsError(f"checkpoint {path} does not exist; train the run first or fix the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a checkpoint we can trust"
        raise LungsError(f"{path} is not a lungs checkpoint ({type(exc).__name__}); use "
                         "checkpoints/best.pt or last.pt from a run folder") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LungsError(f"{path} is not a lungs checkpoint (no '{CHECKPOINT_FORMAT}' marker); use "
                         "checkpoints/best.pt or last.pt from a run folder")
    return state


def check_resume(run_dir: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Before anything is written: refuse to resume a run whose ``last.pt`` is unreadable or holds
    another architecture (the run folder's params.yaml must keep describing its checkpoints)."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not params["resume"] or not last.is_file():
        return
    trained = load_checkpoint(last).get("params", {}).get("model")
    if trained is not None and trained != params["model"]:
        raise LungsError(f"{last} holds weights of '{trained}' that do not fit this model ('{params['model']}'); "
                         f"set model: {trained} or choose a checkpoint of this model")


def load_weights(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load model weights, turning an architecture mismatch into one actionable line."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as exc:
        trained = state.get("params", {}).get("model", "another architecture")
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise LungsError(f"{source} holds weights of '{trained}' that do not fit this model ({first[:120]}); "
                         f"set model: {trained} or choose a checkpoint of this model") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    sampler = None
    if world > 1:
        # Shard without padding so no sample is counted twice.
        sampler = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(params["batch_size"], 64), shuffle=False,
                                         sampler=sampler, num_workers=params["num_workers"],
                                         pin_memory=device.type == "cuda")
    dtype = autocast_dtype(device, params["precision"])
    meter = task.meter(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    loss_fn = loss_fn or task.make_loss(params, dataset)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for x, y, _ in bar(loader, desc="validate", leave=False, disable=not progress or rank != 0):
            x, target = task.eval_inputs(x.to(device, non_blocking=True), y.to(device, non_blocking=True), params)
            if params["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            loss_sum += task.loss_sum(out.float(), target, loss_fn)
            n += len(x)
            task.update(meter, out, target)
    model.train(was_training)
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


def fit(model: nn.Module, train_ds: torch.utils.data.Dataset, val_ds: torch.utils.data.Dataset,
        params: Mapping[str, Any], run_dir: str | os.PathLike[str] | None = None, *,
        progress: bool = True, stop_after: int | None = None, task: Task = CLASSIFICATION) -> TrainResult:
    """Train ``model`` and return its history; leaves the best epoch's weights in ``model``.

    With ``run_dir``: ``history.csv`` after every epoch, ``checkpoints/last.pt`` (full state, for exact
    resume) and ``checkpoints/best.pt`` (best validation ``task.score``: macro-F1 for classification,
    Dice for lung masks), all written atomically; ``params['resume']`` continues from ``last.pt``.
    ``stop_after`` ends this call after that many epochs (the schedule still spans
    ``params['epochs']``), for time-boxed sessions that resume later.
    """
    started = time.perf_counter()
    rank, world = _distributed()
    device = select_device(params["device"])
    seed_everything(params["seed"])
    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_dir = run_path / "checkpoints" if run_path is not None else None
    memory_format = torch.channels_last if params["channels_last"] else torch.preserve_format
    model.to(device=device, memory_format=memory_format)
    if params["compile"]:
        model = torch.compile(model)
    net: nn.Module = model
    if world > 1:
        # A model whose forward leaves parameters unused (e.g. the U-Net classifier's mask head) names
        # them in ``unused_in_forward``; DDP then skips them instead of waiting for their gradients.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(unwrap(model), "unused_in_forward", ())))

    loss_fn = task.make_loss(params, train_ds).to(device)
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
    steps = max(1, len(loader))
    optimizer = make_optimizer(unwrap(model), params)
    scheduler = make_scheduler(optimizer, params, steps)
    dtype = autocast_dtype(device, params["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    mixer = presets.mix(params) if isinstance(task, Classification) else None

    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, bad_epochs = 0, -math.inf, 0, 0
    best_metrics: dict[str, Any] = {}
    best_state: dict[str, torch.Tensor] | None = None
    last_path = ckpt_dir / "last.pt" if ckpt_dir is not None else None
    if ckpt_dir is not None and rank == 0:
        for leftover in ckpt_dir.glob(".*.tmp"):  # from a run killed while saving
            leftover.unlink(missing_ok=True)
    if params["resume"] and last_path is not None and last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        load_weights(model, state, str(last_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], generators)
        start_epoch, best_score, best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], list(state["history"])
        best_metrics = state["best_metrics"]
        if rank == 0:
            print(f"resuming from {last_path} after epoch {start_epoch}")

    stopped_early = False
    images_seen, train_seconds = 0, 0.0
    epochs = bar(range(start_epoch, params["epochs"]), desc="epochs", disable=not progress or rank != 0,
                 initial=start_epoch, total=params["epochs"])
    for epoch in epochs:
        if world > 1:
            sampler.set_epoch(epoch)
        net.train()
        epoch_params = {**params, "image_size": train_size(params, epoch)}
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        meter = task.meter(device)
        n_seen = 0
        for x, y, _ in bar(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or rank != 0):
            y = y.to(device, non_blocking=True)
            loss, out, target = train_step(net, x, y, epoch_params, loss_fn=loss_fn, optimizer=optimizer,
                                           scaler=scaler, scheduler=scheduler, mixer=mixer,
                                           generator=generators["augment"], dtype=dtype, task=task)
            # Device-side bookkeeping only: no .item() (a sync) per batch.
            loss_sum += loss.detach().double() * y.shape[0]
            task.update(meter, out.detach(), target)
            n_seen += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        images_seen += n_seen * world
        train_seconds += seconds
        _all_sum(meter.counts)
        _all_sum(loss_sum)
        check_finite(float(loss_sum), epoch + 1, params)
        train_metrics = task.metrics(meter)
        t1 = time.perf_counter()
        # The plain module, not the DDP wrapper: DDP's per-forward buffer broadcast would deadlock
        # when ranks hold different numbers of validation batches.
        val_loss, val_metrics = evaluate(model, val_ds, params, device, loss_fn, progress=progress, task=task)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_size": epoch_params["image_size"],
               "train_loss": float(loss_sum) / max(1, n_seen * world),
               **task.flat(train_metrics, "train_"), "val_loss": val_loss, **task.flat(val_metrics, "val_"),
               "train_seconds": seconds, "val_seconds": time.perf_counter() - t1,
               "images_per_s": n_seen * world / max(seconds, 1e-9)}
        history.append(row)
        score = val_metrics[task.score]
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
            best_metrics = val_metrics
        else:
            bad_epochs += 1
        if progress and rank == 0:
            epochs.set_postfix({"loss": f"{row['train_loss']:.3f}", f"val_{task.score}": f"{score:.3f}",
                                "best": f"{best_score:.3f}"})
        state = {"format": CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(), "epoch": epoch + 1,
                 "best_score": best_score, "score": task.score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                 "val_metrics": val_metrics, "best_metrics": best_metrics, "params": dict(params)}
        if improved:
            best_state = {k: v.detach().clone() for k, v in state["model"].items()}
        if rank == 0 and ckpt_dir is not None:
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", state)
            save_checkpoint(ckpt_dir / "last.pt", {
                **state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(generators), "history": history})
            atomic_write_csv(pd.DataFrame(history), run_path / "history.csv")
        if params["patience"] is not None and bad_epochs >= params["patience"]:
            stopped_early = True
            break
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after:
            break

    # Leave the best epoch's weights in the model, whatever epoch training ended on.
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    elif ckpt_dir is not None and (ckpt_dir / "best.pt").is_file():
        load_weights(model, load_checkpoint(ckpt_dir / "best.pt", map_location=device))
    checkpoints = {k: ckpt_dir / f"{k}.pt" for k in ("best", "last")} if ckpt_dir is not None else {}
    return TrainResult(pd.DataFrame(history), best_metrics, best_epoch, len(history), stopped_early,
                       time.perf_counter() - started,
                       images_seen / train_seconds if train_seconds else 0.0, str(device), checkpoints)
