"""What a recipe will cost on this machine, before it runs (``--estimate``; the first line of every run).

A few real training steps of the run's own model are timed at each image side the schedule uses (the
smallest and the largest; sides in between by their pixel count), and one batch of validation inference;
the rest is multiplied out from the numbers of images, epochs, folds and test-time views. The steps run on
a copy of the model, on random films, with the random generators saved and restored, so an estimate
never changes a run's numbers. :func:`kaggle` gives the same figure for Kaggle's GPUs from the per-image
throughputs kept in :data:`H200_TRAIN_IMAGES_PER_S`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..params import is_segmentation
from ..paths import ESTIMATE_ENV
from .schedule import train_size, validated_epochs

#: Training steps timed per image side (after one warm-up step, the median).
STEPS = 3
#: Grid cells outside the chest that the audit's occlusion hides per film (measured: 25 of 64 on average,
#: 10-37 from the 5th to the 95th percentile, on 200 COVID-QU-Ex films at 144 px).
OCCLUDED_CELLS = 25
#: Per epoch besides the steps: history, TensorBoard, progress (seconds; checkpoints are timed).
EPOCH_OVERHEAD_S = 0.05
#: Once per run: starting Python and PyTorch, loading the cached data, the notebook's figures (seconds;
#: measured on the demo's runs: 4-5 s for `lungs train`, 7 s for a notebook under `lungs run`).
START_S = 6.0
#: Kaggle's session limit for a notebook (hours).
KAGGLE_LIMIT_H = 12.0


@dataclass
class Estimate:
    """Expected seconds of a run, by part, and what they were computed from."""

    seconds: float
    parts: dict[str, float]
    machine: str
    plan: str
    measured: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self, detail: bool = False) -> str:
        """One line: ``estimate: about 5.3 min on this machine (...): training 4.6 min, ...; <plan>``, and with
        ``detail`` what was timed."""
        parts = ", ".join(f"{name} {_minutes(s)}" for name, s in self.parts.items() if s >= 0.5) or "every part under a second"
        return (f"estimate: about {_minutes(self.seconds)} on {self.machine}: {parts}; {self.plan}"
                + (f" ({self.measured})" if self.measured and detail else ""))

    def to_json(self) -> str:
        """The estimate as one JSON line (handed to a notebook's kernel or torchrun's workers)."""
        return json.dumps({"seconds": self.seconds, "parts": self.parts, "machine": self.machine, "plan": self.plan,
                           "measured": self.measured})

    @classmethod
    def from_json(cls, text: str) -> Estimate:
        return cls(**json.loads(text))


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _sizes(params: Mapping[str, Any]) -> list[int]:
    return [train_size(params, e) for e in range(params["epochs"])]


def _images(params: Mapping[str, Any], n: int) -> tuple[int, int, int]:
    """(parts trained, train images per part, held-out images per part) for ``n`` labelled films."""
    n = min(n, params["limit"]) if params.get("limit") else n
    k = params.get("cv")
    if k:
        return k, n - n // k, n // k
    val = max(int(round(n * params["val_fraction"])), 3)
    return 1, n - val, val


def _done(params: Mapping[str, Any]) -> int:
    """Epochs already trained, summed over the parts, when resuming (from their last.pt)."""
    if not params.get("resume"):
        return 0
    from ..paths import run_dir
    from ..runfolder import CHECKPOINTS, LAST, part_dirs
    from .checkpoint import load_checkpoint

    done = 0
    for part in part_dirs(run_dir(params), params.get("cv")):
        last = part / CHECKPOINTS / LAST
        if last.is_file():
            try:
                done += int(load_checkpoint(last).get("epoch", 0))
            except Exception:  # noqa: BLE001 - an unreadable checkpoint is the resume's error to report
                pass
    return done


@contextlib.contextmanager
def _same_random_draws() -> Iterator[None]:
    """Puts every random state back afterwards (as a checkpoint keeps it): an estimate must not shift
    the run's random draws."""
    from .checkpoint import rng_state, set_rng_state

    state = rng_state({})
    try:
        yield
    finally:
        set_rng_state(state, {})


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up: kernels and memory for this shape
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class Timings:
    """What was timed on this machine for a recipe: seconds per training image at each timed side, per
    inference image, per checkpoint save; and on what."""

    per_image_train: dict[int, float]
    per_image_eval: float
    save_s: float
    machine: str

    def train_cost(self, side: int) -> float:
        """Seconds per training image at ``side``, by pixel count between the two timed sides."""
        lo, hi = min(self.per_image_train), max(self.per_image_train)
        if hi == lo:
            return self.per_image_train[hi]
        w = (side * side - lo * lo) / (hi * hi - lo * lo)
        return self.per_image_train[lo] + w * (self.per_image_train[hi] - self.per_image_train[lo])


def time_steps(params: Mapping[str, Any], shape: tuple[int, int]) -> Timings:
    """Time a few real training steps of the recipe's own model on random films stored at ``shape``, at the
    smallest and largest side its schedule uses, one batch of validation inference and one checkpoint save
    (every random state restored afterwards)."""
    import torch

    from .. import models
    from ..hardware import describe_cpu
    from ..xrays.data import XrayDataset
    from .device import autocast_dtype, select_device
    from .inference import infer
    from .loop import train_step
    from .optim import make_optimizer
    from .tasks import task_for

    device = select_device(params["device"])
    dtype = autocast_dtype(device, params["precision"])
    task = task_for(params)
    channels = 2 if is_segmentation(params) or params["masks"] != "none" else 1
    with _same_random_draws():
        model = models.for_params(params).to(device, memory_format=torch.channels_last if params["channels_last"]
                                             else torch.preserve_format)
        batch = params["batch_size"]
        x = torch.randint(0, 256, (batch, channels, *shape), dtype=torch.uint8)
        if is_segmentation(params):
            x[:, 1] = (x[:, 1] > 127).to(torch.uint8) * 255
        y = torch.randint(0, 3, (batch,)).to(device)
        optimizer = make_optimizer(model, params)
        loss_fn = task.make_loss(params, _Labels()).to(device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        sizes = _sizes(params)

        def step(side: int) -> None:
            train_step(model, x, y, {**params, "image_size": side}, loss_fn=loss_fn, optimizer=optimizer,
                       scaler=scaler, dtype=dtype, task=task, generator=torch.Generator().manual_seed(0))
            _sync(device)

        per_image = {side: _time(lambda s=side: step(s), STEPS) / batch for side in sorted({min(sizes), max(sizes)})}
        eval_batch = max(64, batch)
        films = torch.randint(0, 256, (eval_batch, *shape), dtype=torch.uint8).numpy()
        held_out = XrayDataset(films, np.arange(eval_batch), np.zeros(eval_batch, np.int64),
                               masks=films if channels == 2 else None)

        def validate() -> None:
            for _ in infer(model, held_out, prepare=lambda a, b: task.eval_inputs(a, b, params), device=device,
                           batch_size=eval_batch, channels_last=params["channels_last"], autocast_dtype=dtype):
                pass
            _sync(device)

        eval_per_image = _time(validate, 1) / eval_batch
        buffer = io.BytesIO()
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        save_s = time.perf_counter() - t0
    machine = (f"this machine ({device}" + (f", {describe_cpu()}" if device.type == "cpu" else "")
               + f", {'fp32' if dtype is None else str(dtype).replace('torch.', '') + ' autocast'})")
    return Timings(per_image, eval_per_image, save_s, machine)


def cost(params: Mapping[str, Any], timings: Timings, n_train: int, n_test: int, done: int = 0,
         n_extra: int = 0) -> Estimate:
    """The cost model: ``timings`` multiplied out over the recipe's parts, epochs (``done`` of them already
    trained), images (``n_extra``: films every part trains on besides its labelled ones, the pseudo-labelled
    test films), test-time views and the audit."""
    seg = is_segmentation(params)
    parts, n_fit, n_held = _images(params, n_train)
    n_fit += n_extra
    epochs = params["epochs"]
    sizes = _sizes(params)
    left_epochs = max(0, parts * epochs - done)
    share = left_epochs / max(1, parts * epochs)
    eval_s = timings.per_image_eval
    train_s = parts * n_fit * sum(timings.train_cost(s) for s in sizes) * share
    val_s = parts * validated_epochs(params) * share * n_held * eval_s  # val_every skips some
    overhead_s = left_epochs * (2 * timings.save_s + EPOCH_OVERHEAD_S)
    views = (2 if params["tta"] else 1) if seg else (4 if params["hflip"] > 0 else 3) if params["tta"] else 1
    predict_s = parts * (n_held + n_test) * views * eval_s
    audit_s = 0.0 if seg or not params["audit"] else \
        parts * n_held * ((OCCLUDED_CELLS + 3) * eval_s + timings.train_cost(params["image_size"]))
    parts_s = {"training": train_s + overhead_s, "validation": val_s, "prediction": predict_s, "audit": audit_s,
               "start-up": START_S}
    plan = (f"{parts} fold(s) x " if parts > 1 else "") + f"{epochs} epochs x {n_fit - n_extra} train " + \
        (f"(+{n_extra} pseudo-labelled) " if n_extra else "") + f"+ {n_held} held-out " \
        f"films, {n_test} test films" + (f" x {views} views" if views > 1 else "") + \
        (f"; {done} epoch(s) already done" if done else "")
    measured = "timed: " + ", ".join(f"{s * 1e3:.1f} ms per training image at {side} px"
                                     for side, s in sorted(timings.per_image_train.items())) + \
        f", {eval_s * 1e3:.1f} ms per inference image"
    return Estimate(sum(parts_s.values()), parts_s, timings.machine, plan, measured,
                    {"per_image_train": timings.per_image_train, "per_image_eval": eval_s, "save_s": timings.save_s})


def measure(params: Mapping[str, Any], n_train: int, n_test: int, shape: tuple[int, int],
            n_extra: int = 0) -> Estimate:
    """The estimate for ``params`` on ``n_train`` labelled and ``n_test`` test films stored at ``shape``
    (and ``n_extra`` pseudo-labelled ones): :func:`time_steps` here, then :func:`cost`."""
    return cost(params, time_steps(params, shape), n_train, n_test, _done(params), n_extra)


class _Labels:
    labels = np.zeros(0, np.int64)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def for_params(params: Mapping[str, Any], *, progress: bool = False) -> Estimate:
    """The estimate for a resolved params mapping: counts the data's films (decoding them into the cache
    once, as the run would) and the pseudo-labelled test films it would add, then :func:`measure`."""
    import warnings

    from ..paths import run_dir
    from ..xrays import data as data_mod
    from ..xrays import pseudo

    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    extra = 0
    if params.get("pseudo_labels"):
        with warnings.catch_warnings():  # "none selected" is the run's to say, once
            warnings.simplefilter("ignore")
            extra = len(pseudo.select(params["pseudo_labels"], data.test.ids, params["pseudo_threshold"],
                                      run_dir(params)))
    return measure(params, len(data.train), len(data.test), data.image_size, extra)


# ------------------------------------------------------------------------------------------------ Kaggle
#: Images per second at 256 px on one NVIDIA H200, bf16 autocast (docs/benchmarks.md): training steps
#: (forward + backward + AdamW, batch 64, bench/train_step.py) and plain inference (batch 1024,
#: bench/predict.py). The one table Kaggle's estimate comes from; other models are scaled from the
#: measured model nearest in forward GFLOPs.
H200_TRAIN_IMAGES_PER_S = {"simple_cnn": 5527.0, "resnet18": 4584.0, "vgg19": 1151.0}
H200_INFER_IMAGES_PER_S = {"resnet_tiny": 12307.0}
#: Forward GFLOPs per 256 px image (docs/real-data.md, models), for the scaling above.
GFLOPS_256 = {"simple_cnn": 1.85, "resnet_tiny": 1.11, "resnet18": 4.53, "resnet34": 9.36, "mobilenet_v2": 0.76,
              "efficientnet_b0": 0.99, "unet": 24.06, "unet_small": 1.51, "vgg16": 40.75, "vgg19": 51.62,
              "vgg_cnn": 51.85}
#: How much slower one Kaggle T4 is than one H200 for these small nets. Not measured here (no T4 was
#: available): the ratio of their dense fp16 tensor throughput (65 vs 989 TFLOPS) is 15x; the small nets
#: keep an H200 only 60-90 % busy, so 12x is used. Two T4s under torchrun: x 1.8.
T4_SLOWDOWN = 12.0


def _scaled(table: Mapping[str, float], name: str) -> tuple[float, str]:
    flops = GFLOPS_256.get(name, 4.0)
    base = min(table, key=lambda m: abs(math.log(GFLOPS_256[m] / flops)))
    return table[base] * GFLOPS_256[base] / flops, base


def kaggle(params: Mapping[str, Any], n_train: int = 27_000, n_test: int = 6_920, gpus: int = 1) -> dict[str, Any]:
    """Expected time on Kaggle's T4 GPU(s) for ``params`` at the competition's size, from the per-image
    figures above, and a warning when that passes Kaggle's session limit."""
    speed = 1.8 if gpus == 2 else 1.0
    train_ips, base = _scaled(H200_TRAIN_IMAGES_PER_S, params["model"])
    infer_ips, _ = _scaled(H200_INFER_IMAGES_PER_S, params["model"])
    train_ips, infer_ips = train_ips / T4_SLOWDOWN * speed, infer_ips / T4_SLOWDOWN * speed
    pixels = [(s / 256) ** 2 for s in _sizes(params)]
    full = (params["image_size"] / 256) ** 2
    parts, n_fit, n_held = _images(params, n_train)
    views = (4 if params["hflip"] > 0 else 3) if params["tta"] else 1
    seconds = parts * (n_fit * sum(pixels) / train_ips + validated_epochs(params) * n_held * full / infer_ips
                       + (n_held + n_test) * views * full / infer_ips)
    hours = seconds / 3600
    return {"seconds": seconds, "per_part_seconds": seconds / parts, "parts": parts,
            "over_limit": hours > KAGGLE_LIMIT_H,
            "line": (f"expected on Kaggle ({gpus} x T4): about {_minutes(seconds)}"
                     + (f" ({_minutes(seconds / parts)} per fold)" if parts > 1 else "")
                     + f" for {params['epochs']} epochs{f' x {parts} folds' if parts > 1 else ''} on {n_train} "
                     f"films; projected from measured H200 throughput ({base} for training), scaled by forward "
                     f"GFLOPs and a {T4_SLOWDOWN:g}x T4 slowdown that no T4 has confirmed yet"),
            "warning": (f"warning: that is over Kaggle's {KAGGLE_LIMIT_H:g}-hour session limit: the run will stop at its "
                        "time_limit and submit what it has trained by then; for the whole recipe use fewer epochs or "
                        "folds, a smaller model or image_size, or --gpus 2")
            if hours > KAGGLE_LIMIT_H else ""}


def announce(params: Mapping[str, Any], data: Any) -> Estimate:
    """Print (and return) the run's estimate: the one ``lungs run`` measured and handed to this notebook's
    kernel (:data:`lungs_utils.paths.ESTIMATE_ENV`), else measured here on ``data`` (a
    :class:`~lungs_utils.xrays.data.LungsData`)."""
    handed = os.environ.get(ESTIMATE_ENV)
    found = Estimate.from_json(handed) if handed else measure(params, len(data.train), len(data.test), data.image_size)
    print(found.line(), flush=True)
    return found
