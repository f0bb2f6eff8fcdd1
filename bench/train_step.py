"""Images/s of full training steps — forward, backward, optimizer, metrics bookkeeping — our pipeline
vs the original-style baseline (per-item PIL loader, RGB input, fp32, per-batch `.item()` + sklearn
F1) feeding the same architecture; the model alone on a resident batch; and the share of our step
time that is not model compute (the data path and bookkeeping, timed on their own per step).

    python bench/train_step.py [--models simple_cnn resnet18 vgg19] [--n 600] [--steps 12]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import f1_score

from common import baseline_loader, machine, parser, phantom_data, table

from lungs_utils.xrays import data as D
from lungs_utils import models
from lungs_utils.xrays import presets
from lungs_utils import params as P
from lungs_utils.stats.metrics import ConfusionMatrix
from lungs_utils.engine.device import autocast_dtype
from lungs_utils.engine.loop import train_step
from lungs_utils.engine.optim import make_loss, make_optimizer

# vgg19 at 256 px is minutes per step batch on a 2-core CPU: measured at 128 px there.
CPU_SIZE = {"vgg19": 128, "vgg16": 128, "vgg_cnn": 128}


def _model(name: str, params: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = models.build(name).to(device, memory_format=torch.channels_last if params["channels_last"]
                                  else torch.preserve_format)
    opt = make_optimizer(model, params)
    return (torch.compile(model) if params["compile"] else model), opt


def model_only(name: str, size: int, params: dict, device: torch.device, steps: int) -> float:
    """The model alone: a resident, already-normalised batch; forward, backward, step."""
    model, opt = _model(name, params, device)
    loss_fn = make_loss(params, np.zeros(0, np.int64)).to(device)
    x = torch.randn(params["batch_size"], 1, size, size, device=device)
    if params["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (params["batch_size"],), device=device)
    dtype = autocast_dtype(device, params["precision"])

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * params["batch_size"] / (time.perf_counter() - t)


def _loop(params: dict, device: torch.device, dataset: D.XrayDataset, steps: int, step) -> float:
    """Seconds per step of ``step(x_uint8, y_on_device) -> (loss, logits)`` over shuffled cached batches,
    with loss and confusion matrix accumulated on the device (no per-batch sync), as ``train.fit`` does."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=params["batch_size"], shuffle=True,
                                         pin_memory=device.type == "cuda", drop_last=True)
    cm, loss_sum = ConfusionMatrix(device=device), torch.zeros((), device=device, dtype=torch.float64)

    def run(n_steps: int) -> None:
        nonlocal loss_sum
        done = 0
        while done < n_steps:
            for x, y, _ in loader:
                y = y.to(device, non_blocking=True)
                loss, logits = step(x, y)
                loss_sum += loss.detach().double() * y.shape[0]
                cm.update(y, logits.detach().argmax(1))
                done += 1
                if done >= n_steps:
                    return

    run(1)
    _sync(device)
    t = time.perf_counter()
    run(steps)
    cm.matrix()  # the once-per-epoch reduction
    _sync(device)
    return (time.perf_counter() - t) / steps


def ours(name: str, size: int, params: dict, device: torch.device, dataset: D.XrayDataset, steps: int) -> float:
    """Images/s of what ``train.fit`` does per step (the same ``train.train_step``): cached uint8 batch →
    device → batched augmentation → step."""
    model, opt = _model(name, params, device)
    loss_fn = make_loss(params, np.zeros(0, np.int64)).to(device)
    dtype = autocast_dtype(device, params["precision"])
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits, _ = train_step(model, x, y, params, loss_fn=loss_fn, optimizer=opt, scaler=scaler,
                                     generator=gen, dtype=dtype)
        return loss, logits

    return params["batch_size"] / _loop(params, device, dataset, steps, step)


def data_path(params: dict, device: torch.device, dataset: D.XrayDataset, steps: int) -> float:
    """Seconds per step of everything in ``ours`` that is not the model: batch fetch, transfer, batched
    augmentation, loss / confusion-matrix bookkeeping (on stand-in logits), measured on its own."""
    gen = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = presets.train_batch(x.to(device, non_blocking=True), params, gen)
        logits = x.contiguous(memory_format=torch.channels_last).mean(dim=(2, 3)).expand(-1, 3)
        return logits.sum(), logits

    return _loop(params, device, dataset, steps, step)


def baseline(name: str, size: int, params: dict, device: torch.device, data_dir, steps: int) -> float:
    """The original project's way: PIL per item, 3-channel RGB, fp32, contiguous, per-batch
    ``loss.item()`` and sklearn F1 on the batch."""
    model = models.build(name, in_channels=3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = baseline_loader(data_dir, size, params["batch_size"])
    f1s, losses = [], []

    def run(n_steps: int) -> int:
        done = 0
        while done < n_steps:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                f1s.append(f1_score(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro"))
                done += 1
                if done >= n_steps:
                    break
        return done * params["batch_size"]

    run(1)
    t = time.perf_counter()
    n = run(steps)
    _sync(device)
    return n / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["simple_cnn", "resnet18", "vgg19"])
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (ours and model-only)")
    p.set_defaults(n=600)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [("model", "px", "model only img/s", "ours end-to-end img/s", "e2e / model only",
             "data+metrics ms/step", "overhead share", "baseline img/s", "ours / baseline")]
    for name in args.models:
        size = CPU_SIZE.get(name, args.size) if device.type == "cpu" else args.size
        data_dir = phantom_data(args.data, args.n, args.size)
        data = D.load(data_dir, cache_dir=args.data / "cache", progress=False)
        dataset = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"])
        params = P.load(overrides={"image_size": size, "batch_size": args.batch_size,
                                   "precision": args.precision, "channels_last": True,
                                   "compile": args.compile})
        alone = model_only(name, size, params, device, args.steps)
        end_to_end = ours(name, size, params, device, dataset, args.steps)
        base = baseline(name, size, params, device, data_dir, args.steps)
        # Overhead = the non-model work per step over the whole step, both measured directly (the
        # ratio of two separately timed throughputs swings by several % on a shared CPU).
        other = data_path(params, device, dataset, max(args.steps, 20))
        step = args.batch_size / end_to_end
        rows.append((name, str(size), f"{alone:,.1f}", f"{end_to_end:,.1f}", f"{end_to_end / alone:.2f}",
                     f"{other * 1000:,.1f}", f"{other / step:.1%}", f"{base:,.1f}", f"{end_to_end / base:.1f}x"))
        print(f"{name}: done", flush=True)
    print(f"machine: {machine()}; batch {args.batch_size}; precision {args.precision}"
          f"{'; torch.compile' if args.compile else ''}")
    print(table(rows))


if __name__ == "__main__":
    main()
