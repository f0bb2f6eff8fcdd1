"""Does ``torch.compile`` pay on the CPU recipes? Images/s of their training step (the suite's
``train.train_step``: augmentation, forward, backward, optimizer) eager vs compiled, in bf16 autocast
(where the CPU has bf16 instructions) and fp32, side by side in one process run; plus the compile
warm-up and after how many steps it is paid back.

    python bench/compile_cpu.py [--recipes cpu_small cpu_bf16] [--precisions bf16 fp32] [--rounds 3]

The model is compiled as ``compile: true`` does in training (``torch.compile(model)`` in
``train.start_fit``). Eager and compiled alternate (eager, compiled, eager, compiled, ...) so that both
see the same load when another process shares the CPU; the ratio is taken within each pair. Batches
are resident uint8 batches of the phantom set (the loader costs the same either way). The inductor
cache starts empty, as on a fresh machine, unless ``--warm-cache``. Measured at the recipe's final
``image_size``: with progressive resizing (``start_size``) a compiled run recompiles once more.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import ROOT, machine, phantom_data, rate, table

from lungs_utils.xrays import data as D
from lungs_utils import models
from lungs_utils.xrays import presets
from lungs_utils import params as P
from lungs_utils.errors import LungsError
from lungs_utils.engine.device import autocast_dtype
from lungs_utils.engine.loop import train_step
from lungs_utils.engine.optim import make_loss, make_optimizer

WARMUP_STEPS = 3  # the first compiled steps: compilation (forward and backward graphs) happens here


@dataclass
class Trainer:
    """One model with its optimizer, stepping through resident batches with ``train.train_step``."""

    net: torch.nn.Module
    params: dict
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    dtype: torch.dtype | None
    step_no: int = 0

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.net, self.params)
        self.loss_fn = make_loss(self.params, np.zeros(0, np.int64))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.mixer = presets.mix(self.params)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> int:
        """One training step; returns the images it took."""
        x, y = self.batches[self.step_no % len(self.batches)]
        self.step_no += 1
        train_step(self.net, x, y, self.params, loss_fn=self.loss_fn, optimizer=self.optimizer, scaler=self.scaler,
                   mixer=self.mixer, generator=self.generator, dtype=self.dtype)
        return x.shape[0]


def recipe(name: str, precision: str) -> dict:
    """The recipe's params (``params/<name>.yaml``) in ``precision``, on the CPU, uncompiled."""
    path = ROOT / "params" / f"{name}.yaml"
    if not path.is_file():
        raise LungsError(f"no recipe {path}; name one of params/*.yaml, e.g. cpu_small")
    return P.load(path, {"precision": precision, "device": "cpu", "compile": False})


def resident_batches(dataset: D.XrayDataset, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` shuffled uint8 batches held in memory."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = []
    for x, y, _ in loader:
        batches.append((x.clone(), y.clone()))
        if len(batches) == count:
            break
    return batches


def measure(name: str, precision: str, dataset: D.XrayDataset, rounds: int, seconds: float) -> dict:
    """Eager and compiled images/s (alternating rounds) and the compile warm-up of one recipe."""
    params = recipe(name, precision)
    dtype = autocast_dtype(torch.device("cpu"), precision)
    batches = resident_batches(dataset, params["batch_size"], 8)
    torch.manual_seed(params["seed"])
    model = models.build(params["model"]).to(memory_format=torch.channels_last)
    eager = Trainer(model, params, batches, dtype)
    compiled = Trainer(torch.compile(copy.deepcopy(model)), params, batches, dtype)
    for _ in range(WARMUP_STEPS):
        eager.step()
    t = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        compiled.step()
    first_steps = time.perf_counter() - t
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        rates["eager"].append(rate(eager.step, seconds))
        rates["compiled"].append(rate(compiled.step, seconds))
    # Under 100 %: another process took cores meanwhile, and torch's threads wait for each other.
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    eager_rate, compiled_rate = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    # The ratio within each round pair (same load on both), then the median over the pairs.
    ratio = statistics.median(c / e for e, c in zip(rates["eager"], rates["compiled"]))
    batch = params["batch_size"]
    # Warm-up = what the first steps took beyond the same steps at the compiled steady speed.
    warmup = first_steps - WARMUP_STEPS * batch / compiled_rate
    saved_per_step = batch / eager_rate * (1 - 1 / ratio)
    return {"recipe": name, "precision": precision, "size": params["image_size"], "batch": batch,
            "eager": eager_rate, "compiled": compiled_rate, "ratio": ratio, "warmup": warmup,
            "break_even": warmup / saved_per_step if saved_per_step > 0 else None, "cpu_share": cpu_share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["cpu_small", "cpu_bf16"], help="params/<name>.yaml recipes")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 and fp32 on a CPU with bf16 instructions, else fp32")
    p.add_argument("--rounds", type=int, default=3, help="eager / compiled round pairs per recipe")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed round")
    p.add_argument("--warm-cache", action="store_true", help="keep and use the inductor cache of earlier runs")
    p.add_argument("--n", type=int, default=320, help="phantom train images the batches come from (default 320)")
    p.add_argument("--size", type=int, default=256, help="phantom image size (default 256)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "bench", help="where the phantom set lives")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if not args.warm_cache:
            # A fresh cache: the warm-up a new machine pays, not a cache hit from an earlier run here.
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="lungs-inductor-"))
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        rows = run(args)
    print(f"machine: {machine()}; training step on resident phantom batches ({args.size}px source), "
          f"{args.rounds} alternating rounds of {args.seconds:g} s each, median")
    print(table(rows))
    print("CPU share: CPU time this process got over wall time x threads while timing; well under 100 % "
          "means another process competed and the figures are unreliable")


def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The table's rows: one per recipe and precision."""
    for name in args.recipes:
        recipe(name, "fp32")  # a wrong name fails before minutes of work
    precisions = args.precisions or (["bf16", "fp32"] if autocast_dtype(torch.device("cpu"), "auto") else ["fp32"])
    data = D.load(phantom_data(args.data, args.n, args.size), cache_dir=args.data / "cache", progress=False)
    dataset = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"])
    rows = [("recipe", "precision", "px", "batch", "eager img/s", "compiled img/s", "compiled / eager",
             "warm-up s", "break-even steps", "CPU share")]
    for name in args.recipes:
        for precision in precisions:
            r = measure(name, precision, dataset, args.rounds, args.seconds)
            rows.append((r["recipe"], r["precision"], str(r["size"]), str(r["batch"]), f"{r['eager']:,.1f}",
                         f"{r['compiled']:,.1f}", f"{r['ratio']:.2f}x", f"{r['warmup']:.1f}",
                         f"{r['break_even']:,.0f}" if r["break_even"] is not None else "never",
                         f"{r['cpu_share']:.0%}"))
            print(f"{name} {precision}: done", flush=True)
    return rows


if __name__ == "__main__":
    try:
        main()
    except LungsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
