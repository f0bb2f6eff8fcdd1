"""The parts of a run that train a model: one per fold of a cross-validation run (``cv: k``), else the run
itself. Classification and lung segmentation share them.

A :class:`Part` is a complete (sub-)run: its folder (``fold_<k>/`` or the run folder), its params (fold
``k`` trains with ``seed + k``: its own initial weights and batches), the rows of the split it trains and
validates on, its datasets and model, and after training its result. :func:`train_parts` trains them one
after the other, saying per part how long it took and how long the rest should take; a run killed in a
part resumes in that part (``resume``), the finished ones only reload.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..engine.checkpoint import check_resume, load_checkpoint, load_weights
from ..engine.distributed import is_main_process
from ..engine.loop import TrainResult, fit
from ..engine.tasks import Task
from ..errors import LungsError
from ..runfolder import CHECKPOINTS, HISTORY_FILE, LAST, METRICS_FILE, BEST, part_dirs, read_json
from ..xrays.data import JoinedDataset, XrayDataset
from ..xrays.folds import Split
from . import trial


@dataclass
class Part:
    """One model's share of a run: fold ``index`` of a cross-validation run, or the whole single split."""

    index: int
    folder: Path
    params: dict[str, Any]
    rows: pd.DataFrame  # id, target_feature, split (train / val)
    train: XrayDataset | JoinedDataset  # joined: with pseudo-labelled test films
    val: XrayDataset
    model: nn.Module
    result: TrainResult | None = None

    @property
    def finished(self) -> bool:
        """Trained to its last epoch (or stopped early by patience), not cut short by ``stop_after``."""
        r = self.result
        return r is not None and (r.epochs_run >= self.params["epochs"] or r.stopped_early)

    def epochs_done(self) -> int:
        """Epochs this part resumes after (0 unless resuming): ``stop_after`` counts only new epochs."""
        last = self.folder / CHECKPOINTS / LAST
        return int(load_checkpoint(last)["epoch"]) if self.params["resume"] and last.is_file() else 0


@dataclass
class CVResult:
    """What training a cross-validation run's folds gave: each fold's result, and the figures of them all
    (epochs summed, the history as one table with a ``fold`` column). It has no best epoch of its own."""

    folds: list[TrainResult] = field(default_factory=list)

    @property
    def history(self) -> pd.DataFrame:
        return pd.concat([r.history.assign(fold=k) for k, r in enumerate(self.folds)], ignore_index=True)

    @property
    def epochs_run(self) -> int:
        return int(sum(r.epochs_run for r in self.folds))

    @property
    def stopped_early(self) -> bool:
        return any(r.stopped_early for r in self.folds)

    best_epoch = None


def check_resumable(params: Mapping[str, Any], run_dir: Path) -> None:
    """Before anything is decoded or written: with ``resume``, every part's ``last.pt`` must be readable and
    hold this architecture (:func:`lungs_utils.engine.checkpoint.check_resume`)."""
    for folder in part_dirs(run_dir, params["cv"]):
        check_resume(folder, params)


def make_parts(params: Mapping[str, Any], run_dir: Path, split: Split,
               datasets: Callable[[pd.DataFrame], tuple[XrayDataset | JoinedDataset, XrayDataset]],
               build: Callable[[], nn.Module]) -> list[Part]:
    """One :class:`Part` per fold of ``split`` (or one for a single split): its datasets from
    ``datasets(rows)``, its model from ``build()`` seeded with the part's seed (the same initial weights
    for the same seed)."""
    parts = []
    for k, folder in enumerate(part_dirs(run_dir, split.k)):
        own = {**params, "seed": params["seed"] + k}
        rows = split.part(k)
        train, val = datasets(rows)
        torch.manual_seed(own["seed"])
        parts.append(Part(k, folder, own, rows, train, val, build()))
    return parts


#: Room a run needs besides its checkpoints: histories, TensorBoard events, figures, predictions (bytes);
#: per image for prediction tables, and per image for a segmentation run's mask PNGs (256 px: 1-3 KB).
ROOM_FIXED, ROOM_PER_IMAGE, ROOM_PER_MASK = 16 << 20, 400, 4 << 10


def checkpoint_bytes(part: Part) -> int:
    """A part's two checkpoints: ``best.pt`` (the weights) and ``last.pt`` (the weights and two optimizer
    moments each)."""
    weights = sum(t.numel() * t.element_size() for t in part.model.state_dict().values())
    return 4 * weights


def room_needed(parts: list[Part], images: int, masks: bool = False) -> int:
    """Bytes a run will write: every part's checkpoints with a margin of a quarter, and the rest
    (:data:`ROOM_FIXED`, prediction tables, mask PNGs)."""
    checkpoints = sum(checkpoint_bytes(p) for p in parts)
    return int(1.25 * checkpoints) + ROOM_FIXED + images * (ROOM_PER_IMAGE + (ROOM_PER_MASK if masks else 0))


def check_room(run_dir: Path, parts: list[Part], images: int, masks: bool = False) -> None:
    """Before anything is written: refuse a run whose checkpoints and predictions will not fit on the disk
    of ``run_dir``, with the figures (a full disk mid-run would cost the epochs trained until then)."""
    need = room_needed(parts, images, masks)
    where = next((f for f in (run_dir, *run_dir.parents) if f.exists()), run_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need:
        raise LungsError(f"run folder {run_dir} needs about {need / 2**20:.0f} MB ({len(parts)} model(s) with "
                         f"{checkpoint_bytes(parts[0]) / 2**20:.1f} MB of checkpoints each, predictions, logs) but "
                         f"{free / 2**20:.0f} MB are free on that disk: free space, or point LUNGS_OUTPUTS (or "
                         "output_dir) at a disk with room")


def train_parts(parts: list[Part], task: Task, *, progress: bool = True, stop_after: int | None = None,
                deadline: float | None = None) -> None:
    """Fit every part's model in turn (its history and checkpoints in its folder). ``stop_after`` ends the
    call after that many epochs, counted over all parts; the next parts then wait for a resume. When the
    time runs out (``deadline``, or SIGTERM: :mod:`lungs_utils.engine.deadline`) the part in training stops
    at a clean point and the next ones are skipped (:func:`usable` says what the run predicts with)."""
    say = print if is_main_process() else (lambda *a, **k: None)
    several = len(parts) > 1
    budget = stop_after
    spent: list[float] = []
    for part in parts:
        name = f"{part.folder.name} ({part.index + 1} of {len(parts)})"
        if budget is not None and budget <= 0:
            say(f"stopped before {name} (stop_after {stop_after}); continue the run with resume", flush=True)
            break
        if several:
            say(f"{name}: {len(part.train)} train / {len(part.val)} validation images", flush=True)
        t0 = time.perf_counter()
        before = part.epochs_done() if budget is not None else 0
        part.result = fit(part.model, part.train, part.val, part.params, part.folder, progress=progress,
                          stop_after=budget, task=task, deadline=deadline,
                          also=trial.callbacks(part.index, len(parts)))
        seconds = time.perf_counter() - t0
        if budget is not None:
            budget -= part.result.epochs_run - before
        if part.result.cut:
            skipped = [p.folder.name for p in parts[part.index + 1:]]
            say(f"{part.result.cut}: the time is up; {name} stopped after epoch {part.result.epochs_run} of "
                f"{part.params['epochs']}" + (f", {', '.join(skipped)} skipped" if skipped else "")
                + "; predicting with what is trained", flush=True)
            break
        if not part.finished:
            break  # stopped inside this part (stop_after): the next parts wait for the resume
        if not several:
            continue
        if part.result.epochs_run > before:  # trained here, not only reloaded: a time per part to go by
            spent.append(seconds)
        left = len(parts) - part.index - 1
        eta = f"; about {np.mean(spent) * left / 60:.1f} min for the {left} fold(s) left" if left and spent else ""
        say(f"{name}: best val {task.score_label} {part.result.best_metrics.get(task.score, float('nan')):.4f} "
            f"(epoch {part.result.best_epoch}), {seconds / 60:.1f} min{eta}", flush=True)


def usable(parts: list[Part], run_name: str) -> list[Part]:
    """The parts a run predicts with: all of them once trained; after the time ran out, the parts that
    finished, else the one cut short (its best checkpoint so far). Otherwise one error line naming the first
    part that has not finished training."""
    if any(p.result is not None and p.result.cut for p in parts):
        done = [p for p in parts if p.finished] or [p for p in parts if p.result is not None and p.result.best_epoch]
        if not done:
            raise LungsError(f"run {run_name}: the time ran out before its first epoch ended, so there is nothing to "
                             "predict with; raise time_limit, or continue the run later with -p resume=true")
        return done
    untrained = [p.index for p in parts if not p.finished]
    if untrained:
        where = f"fold {untrained[0]} of run {run_name}" if len(parts) > 1 else f"run {run_name}"
        count = f" ({len(untrained)} of {len(parts)} folds)" if len(parts) > 1 else ""
        raise LungsError(f"{where} is not trained yet{count}; continue the run with resume = True (-p resume=true)")
    return parts


def time_record(parts: list[Part], used: list[Part], params: Mapping[str, Any]) -> dict[str, Any] | None:
    """``metrics.json["time_limit"]``: the budget, and when the time ran out (``cut``: time_limit or SIGTERM)
    what was skipped and which parts the predictions come from; None without a budget or a cut."""
    cut = next((p.result.cut for p in parts if p.result is not None and p.result.cut), None)
    if not params.get("time_limit") and cut is None:
        return None
    skipped = []
    for p in parts:
        if p.result is None:
            skipped.append(f"{p.folder.name} not trained")
        elif not p.finished:
            kept = "used" if p in used else "not used"
            skipped.append(f"{p.folder.name} after epoch {p.result.epochs_run} of {p.params['epochs']} (its best "
                           f"epoch {p.result.best_epoch}, {kept})")
    return {"minutes": params.get("time_limit"), "cut": cut, "skipped": "; ".join(skipped),
            "parts_used": [p.index for p in used], "parts": len(parts)}


def result_of(parts: list[Part]) -> TrainResult | CVResult:
    """The run's training result: its one part's, or the folds' together."""
    if len(parts) == 1:
        return parts[0].result  # type: ignore[return-value]
    return CVResult([p.result for p in parts if p.result is not None])


def read_back(part: Part, device: str) -> TrainResult:
    """A part trained by other processes (torchrun), read from its folder: its best weights into
    ``part.model``, its history and figures."""
    where = next(part.model.parameters()).device
    load_weights(part.model, load_checkpoint(part.folder / CHECKPOINTS / BEST, map_location=where))
    history = pd.read_csv(part.folder / HISTORY_FILE)
    done = read_json(part.folder / METRICS_FILE)
    score = [k for k in ("macro_f1", "accuracy", "dice", "iou") if f"val_{k}" in done]
    return TrainResult(
        history=history, best_metrics={k: done[f"val_{k}"] for k in score}, best_epoch=done["best_epoch"],
        epochs_run=done["epochs_run"], stopped_early=done["stopped_early"],
        seconds=float(history["train_seconds"].sum()), train_images_per_s=float(history["images_per_s"].median()),
        device=device)


def training_figures(result: TrainResult | CVResult | None) -> dict[str, Any]:
    """What ``metrics.json`` says about the training: from the history, so epochs trained before a resume
    count."""
    has = result is not None and len(result.history)
    return {"best_epoch": result.best_epoch if result else None,
            "epochs_run": result.epochs_run if result else None,
            "stopped_early": result.stopped_early if result else None,
            "train_seconds": float(result.history["train_seconds"].sum()) if has else None,
            "train_images_per_s": float(result.history["images_per_s"].median()) if has else None}
