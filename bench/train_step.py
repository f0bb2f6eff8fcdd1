"""Images/s of full training steps — forward, backward, optimizer, metrics bookkeeping — our pipeline
vs the original-style baseline (per-item PIL loader, RGB input, fp32, per-batch `.item()` + sklearn
F1) feeding the same architecture; plus the share of our step time that is not model compute,
measured against the model alone on a resident batch.

    python bench/train_step.py [--models simple_cnn resnet18 vgg19] [--n 600] [--steps 12]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import f1_score

from common import baseline_loader, machine, parser, phantom_data, table

from lungs_utils import data as D
from lungs_utils import models
from lungs_utils import params as P
from lungs_utils.metrics import ConfusionMatrix
from lungs_utils.train import autocast_dtype, make_loss, make_optimizer, train_step

# vgg19 at 256 px is minutes per step batch on a 2-core CPU: measured at 128 px there.
CPU_SIZE = {"vgg19": 128, "vgg16": 128, "vgg_cnn": 128}


def model_only(name: str, size: int, params: dict, device: torch.device, steps: int) -> float:
    """The model alone: a resident, already-normalised batch; forward, backward, step."""
    model = models.build(name).to(device, memory_format=torch.channels_last if params["channels_last"]
                                  else torch.preserve_format)
    opt = make_optimizer(model, params)
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


def ours(name: str, size: int, params: dict, device: torch.device, dataset: D.XrayDataset, steps: int) -> float:
    """What ``train.fit`` does per step (the same ``train.train_step``): cached uint8 batch → device →
    batched augmentation → step, with loss and confusion matrix accumulated on the device (no per-batch sync)."""
    model = models.build(name).to(device, memory_format=torch.channels_last if params["channels_last"]
                                  else torch.preserve_format)
    opt = make_optimizer(model, params)
    loss_fn = make_loss(params, np.zeros(0, np.int64)).to(device)
    dtype = autocast_dtype(device, params["precision"])
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=params["batch_size"], shuffle=True,
                                         pin_memory=device.type == "cuda", drop_last=True)
    cm, loss_sum = ConfusionMatrix(device=device), torch.zeros((), device=device, dtype=torch.float64)

    def run(n_steps: int) -> int:
        nonlocal loss_sum
        done = 0
        while done < n_steps:
            for x, y, _ in loader:
                y = y.to(device, non_blocking=True)
                loss, logits, _ = train_step(model, x, y, params, loss_fn=loss_fn, optimizer=opt, scaler=scaler,
                                             generator=gen, dtype=dtype)
                loss_sum += loss.detach().double() * y.shape[0]
                cm.update(y, logits.detach().argmax(1))
                done += 1
                if done >= n_steps:
                    break
        return done * params["batch_size"]

    run(1)
    _sync(device)
    t = time.perf_counter()
    n = run(steps)
    cm.matrix()  # the once-per-epoch reduction
    _sync(device)
    return n / (time.perf_counter() - t)


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
    p.set_defaults(n=600)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [("model", "px", "model only img/s", "ours end-to-end img/s", "overhead share",
             "baseline img/s", "ours / baseline")]
    for name in args.models:
        size = CPU_SIZE.get(name, args.size) if device.type == "cpu" else args.size
        data_dir = phantom_data(args.data, args.n, args.size)
        data = D.load(data_dir, cache_dir=args.data / "cache", progress=False)
        dataset = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"])
        params = P.load(overrides={"image_size": size, "batch_size": args.batch_size,
                                   "precision": args.precision, "channels_last": True})
        alone = model_only(name, size, params, device, args.steps)
        end_to_end = ours(name, size, params, device, dataset, args.steps)
        base = baseline(name, size, params, device, data_dir, args.steps)
        rows.append((name, str(size), f"{alone:,.1f}", f"{end_to_end:,.1f}",
                     f"{max(0.0, 1 - end_to_end / alone):.1%}", f"{base:,.1f}", f"{end_to_end / base:.1f}x"))
        print(f"{name}: done", flush=True)
    print(f"machine: {machine()}; batch {args.batch_size}; precision {args.precision}")
    print(table(rows))


if __name__ == "__main__":
    main()
