"""The GPU figure at competition size: ``lungs train params/11_resnet18.yaml`` end to end on a phantom
set as large as the competition's (27,000 train / 6,920 test images at 256 px), timed by stage, with
the GPU's utilisation sampled meanwhile.

    python bench/competition.py              # on a GPU machine: the figure and the target check
    python bench/competition.py --dry-run    # 300 / 80 images, 2 epochs: checks the script on a CPU

Stages: the phantom set (generated once under ``--data``, then reused); the cache build (decode once,
timed on its own into the cache the run then reads, so the split is clean); the run itself, a
subprocess ``python -m lungs_utils train`` (run folder under ``<data>/outputs``), with
``nvidia-smi`` sampling the GPU every 200 ms; then, from the run folder, the epochs (``history.csv``)
and the prediction (``metrics.json``). The target on a GPU: an epoch over the 27k images at 256 px
(training on 80 %, validating on 20 %) in at most 5 s, the whole recipe (cache build + run) in at most
4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common import ROOT, machine

from lungs_utils.xrays import data as D
from lungs_utils import params as P
from lungs_utils import paths
from lungs_utils.xrays import phantom
from lungs_utils.errors import LungsError, failure_line
from lungs_utils.runs.provenance import device_description

COMPETITION = {"n": 27_000, "n_test": 6_920, "size": 256}
DRY_RUN = {"n": 300, "n_test": 80, "epochs": 2}
TARGET_EPOCH_S, TARGET_TOTAL_S = 5.0, 240.0
RUN_NAME = "competition"


@dataclass
class GpuSampler:
    """``nvidia-smi`` utilisation samples, (wall time, percent), of the GPU the run uses, every 200 ms."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    available: bool = False

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        # The run trains on the first visible GPU; nvidia-smi ignores CUDA_VISIBLE_DEVICES, so name it.
        gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        self._proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                       "-lms", "200", "-i", gpu], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self.available = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:  # "[N/A]" on GPUs that do not report it
                continue

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, int] | None:
        """Mean utilisation (percent) and sample count between two wall times; None without samples."""
        inside = [u for t, u in self.samples if start <= t <= end]
        return (statistics.fmean(inside), len(inside)) if inside else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", type=int, default=None, help=f"phantom train images (default {COMPETITION['n']:,}; "
                   f"dry run {DRY_RUN['n']})")
    p.add_argument("--n-test", type=int, default=None, help=f"phantom test images (default "
                   f"{COMPETITION['n_test']:,}; dry run {DRY_RUN['n_test']})")
    p.add_argument("--size", type=int, default=COMPETITION["size"], help="phantom image side, px (default 256)")
    p.add_argument("--params", type=Path, default=ROOT / "params" / "11_resnet18.yaml",
                   help="the recipe (default params/11_resnet18.yaml)")
    p.add_argument("--epochs", type=int, default=None, help=f"override the recipe's epochs (dry run "
                   f"{DRY_RUN['epochs']})")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="passed on to lungs train, e.g. -p batch_size=256; repeatable")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "competition",
                   help="scratch folder: phantom sets, their caches, the run folder (default data/bench/competition)")
    p.add_argument("--dry-run", action="store_true", help=f"tiny: {DRY_RUN['n']} / {DRY_RUN['n_test']} images, "
                   f"{DRY_RUN['epochs']} epochs, unless given")
    args = p.parse_args(argv)
    small = DRY_RUN if args.dry_run else {}
    args.n = args.n if args.n is not None else small.get("n", COMPETITION["n"])
    args.n_test = args.n_test if args.n_test is not None else small.get("n_test", COMPETITION["n_test"])
    args.epochs = args.epochs if args.epochs is not None else small.get("epochs")
    return args


def phantom_set(target: Path, n: int, n_test: int, size: int) -> float | None:
    """Generate the phantom set in ``target`` (its images in ``target/data``) unless it is there already;
    returns the generation seconds (None: reused). All cores draw (threads, see ``phantom.generate``)."""
    if (target / "data" / "train_answers.csv").is_file():
        return None
    print(f"generating the phantom set: {n:,} train / {n_test:,} test images at {size} px ...", flush=True)
    # overwrite: a set whose generation was killed has data/ but no answers; phantom.generate replaces it.
    return float(phantom.generate(target, n_train=n, n_test=n_test, size=size, seed=0, overwrite=True)["seconds"])


def build_cache(data_dir: Path, cache_dir: Path) -> float:
    """Seconds to decode the set into a fresh cache (train, lung masks, test), the one the run reads."""
    # Only this set's cache goes: --data may hold other sets' caches.
    shutil.rmtree(paths.dataset_cache_dir(data_dir, cache_dir), ignore_errors=True)
    t0 = time.perf_counter()
    D.load(data_dir, cache_dir=cache_dir, progress=False)
    return time.perf_counter() - t0


def train(command: list[str], run_dir: Path, log: Path, epochs: int) -> tuple[float, list[float]]:
    """Run ``command`` (``lungs train``), its output to ``log``; returns its wall seconds and the wall times at
    which each epoch's row reached ``history.csv`` (polled every 0.2 s)."""
    history = run_dir / "history.csv"
    ends: list[float] = []
    seen = 0
    env = {**os.environ, "LUNGS_PROGRESS": "off"}
    t0, started = time.perf_counter(), time.time()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                try:
                    stamp = history.stat().st_mtime
                except OSError:
                    continue
                if stamp < started:  # a previous run's file, before this run replaced the folder
                    continue
                rows = len(pd.read_csv(history)) if history.stat().st_size else 0
                for _ in range(rows - seen):
                    ends.append(stamp)
                    print(f"  epoch {len(ends)}/{epochs} done at {time.perf_counter() - t0:,.1f} s", flush=True)
                seen = max(seen, rows)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise LungsError(f"lungs train failed (exit {proc.returncode}): {failure_line(log)[:300]}; "
                         f"the whole log is in {log}")
    return wall, ends


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.data.expanduser().resolve()
    # Run folders go to the scratch folder, never into the project's outputs/ (the child inherits this).
    os.environ["LUNGS_OUTPUTS"] = str(folder / "outputs")
    target = folder / f"n{args.n}_t{args.n_test}_s{args.size}"
    data_dir = target / "data"
    cache_dir = folder / "cache"
    overrides = [f"data_dir={data_dir}", f"cache_dir={cache_dir}", f"run_name={RUN_NAME}", "overwrite=true",
                 *([f"epochs={args.epochs}"] if args.epochs is not None else []), *args.param]
    values = P.load(args.params, overrides)  # a bad -p fails here, before any image is drawn
    run_dir = paths.run_dir(values)
    device = device_description(values["device"])

    generated = phantom_set(target, args.n, args.n_test, args.size)
    print("building the cache ...", flush=True)
    cache_s = build_cache(data_dir, cache_dir)
    command = [sys.executable, "-m", "lungs_utils", "train", str(args.params),
               *[arg for o in overrides for arg in ("-p", o)]]
    print(f"$ lungs train {args.params.name} " + " ".join(f"-p {o}" for o in overrides), flush=True)
    gpu = GpuSampler()
    gpu.start()
    try:
        wall, ends = train(command, run_dir, folder / "train.log", values["epochs"])
    finally:
        gpu.stop()

    history = pd.read_csv(run_dir / "history.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    epoch_s = (history["train_seconds"] + history["val_seconds"]).tolist()
    rest = epoch_s[1:]
    predict_s = metrics.get("predict_seconds")
    other_s = wall - sum(epoch_s) - (predict_s or 0.0)
    total = cache_s + wall
    if ends:
        # Training: from the first epoch's start (its end less its own time) to the last epoch's end.
        busy = gpu.mean(ends[0] - epoch_s[0], ends[-1])
        whole = gpu.mean()
    else:
        busy = whole = None

    def share(value: tuple[float, int] | None) -> str:
        return f"{value[0]:.0f} % ({value[1]} samples)" if value else "n/a"

    print(f"machine: {machine()}")
    print(f"run device: {device}; recipe {args.params.name}: {values['model']} at {values['image_size']} px, "
          f"batch {values['batch_size']}, {values['epochs']} epochs, precision {values['precision']}")
    print(f"data: phantom {args.n:,} train / {args.n_test:,} test at {args.size} px in {data_dir}; "
          + (f"generated in {generated:,.1f} s (once; reused by later runs)" if generated is not None else "reused"))
    print(f"cache build (decode train, lung masks, test once): {seconds(cache_s)}")
    if epoch_s:
        first = history.iloc[0]
        print(f"epoch time (train + val): first {seconds(epoch_s[0])} (train {first['train_seconds']:.1f} + val "
              f"{first['val_seconds']:.1f}), median of the rest "
              + (f"{seconds(statistics.median(rest))} (train {history['train_seconds'][1:].median():.1f} + val "
                 f"{history['val_seconds'][1:].median():.1f})" if rest else "n/a (one epoch)")
              + f"; training {history['images_per_s'].median():,.0f} img/s (median)")
    print(f"prediction (validation + test, TTA {'on' if values['tta'] else 'off'}): {seconds(predict_s)}")
    print(f"rest of the run (start-up, data load, model build, audit, writing): {seconds(other_s)}")
    print(f"lungs train wall: {seconds(wall)}; whole recipe (cache build + lungs train): {seconds(total)}")
    print(f"GPU busy: {share(busy)} mean utilisation during the epochs, {share(whole)} over the whole run"
          if gpu.available else "GPU busy: n/a (no nvidia-smi)")
    print(f"val macro-F1 (phantom data): {metrics['val_macro_f1']:.4f}")
    at_size = (args.n, args.n_test, args.size, values["image_size"]) == (
        COMPETITION["n"], COMPETITION["n_test"], COMPETITION["size"], COMPETITION["size"])
    if not device.startswith("cuda"):
        print("target (GPU): not checked: the run was not on a GPU")
    elif not epoch_s:
        print("target (GPU): not checked: no epoch ran")
    elif not at_size:
        print("target (GPU): not checked: only at competition size (27,000 / 6,920 images, 256 px)")
    else:
        epoch = statistics.median(rest) if rest else epoch_s[0]
        verdict = {True: "met", False: "MISSED"}
        print(f"target (GPU): epoch of 27k at 256 px <= {TARGET_EPOCH_S:g} s: {epoch:.1f} s, "
              f"{verdict[epoch <= TARGET_EPOCH_S]}; whole recipe <= {TARGET_TOTAL_S / 60:g} min: "
              f"{total / 60:.1f} min, {verdict[total <= TARGET_TOTAL_S]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LungsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the training subprocess was stopped in train()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
