"""What happens around the training loop, as callbacks: checkpoints and exact resume, the history file,
early stopping, progress bars, log lines and TensorBoard.

The interface is three hooks, each given the loop's :class:`lungs_utils.engine.state.FitState` (the model,
optimizer, scheduler, generators, history, best score, ...), called in list order:

- ``on_fit_start(state)``: before the first epoch (a resume loads ``last.pt`` into the state here);
- ``on_epoch_end(state)``: after each epoch's validation, once ``state.history[-1]`` holds the epoch's row
  and the best score is updated (``state.improved``); setting ``state.stop`` ends the loop after the hooks;
- ``on_fit_end(state)``: after the last epoch, before the best weights are put back in the model.

Under torchrun every rank calls every hook (ranks must agree on ``state.stop``); a callback that writes
files does so on rank 0 only (``state.rank == 0``). :func:`default_callbacks` is what ``fit`` uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..io import atomic_write_csv
from ..progress import bar
from .checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, load_weights, rng_state, save_checkpoint,
                         set_rng_state, unwrap)
from .deadline import SIGTERM, TIME_LIMIT, sigterm_received
from .distributed import broadcast_from_first

if TYPE_CHECKING:
    from .state import FitState

#: Folder of a run's TensorBoard event files.
TB_DIR = "tb"


class Callback:
    """Base class: every hook does nothing; subclasses override the ones they need."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch of this call."""

    def on_epoch_end(self, state: FitState) -> None:
        """After an epoch's training and validation."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch of this call."""


class Checkpoint(Callback):
    """``checkpoints/best.pt`` (best validation score) and ``last.pt`` (the full state: optimizer,
    scheduler, scaler, every random generator, history) after each epoch, written atomically; with
    ``params['resume']`` the loop continues from ``last.pt`` exactly where it stopped."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.last = self.folder / "last.pt"

    def on_fit_start(self, s: FitState) -> None:
        if s.rank == 0:
            for leftover in self.folder.glob(".*.tmp"):  # from a run killed while saving
                leftover.unlink(missing_ok=True)
        if not (s.params["resume"] and self.last.is_file()):
            return
        state = load_checkpoint(self.last, map_location=s.device)
        load_weights(s.model, state, str(self.last))
        if s.ema is not None and "ema" in state:  # (a run that adds ema on resume starts its average here)
            s.ema.load_state_dict(state["ema"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        s.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], s.generators)
        s.epoch, s.best_score, s.best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        s.bad_epochs, s.history, s.best_metrics = state["bad_epochs"], list(state["history"]), state["best_metrics"]
        s.resumed_from = self.last

    def on_epoch_end(self, s: FitState) -> None:
        if s.rank != 0:
            return
        state = {"format": CHECKPOINT_FORMAT, "epoch": s.epoch,
                 "best_score": s.best_score, "score": s.task.score, "best_epoch": s.best_epoch,
                 "bad_epochs": s.bad_epochs, "val_metrics": s.val_metrics, "best_metrics": s.best_metrics,
                 "params": dict(s.params)}
        if s.improved:  # the weights predictions use: with ema, the average
            save_checkpoint(self.folder / "best.pt", {**state, "model": s.evaluated.state_dict()})
        save_checkpoint(self.last, {**state, "model": unwrap(s.model).state_dict(),
                                    **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
                                    "optimizer": s.optimizer.state_dict(),
                                    "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
                                    "rng": rng_state(s.generators), "history": s.history})

    def on_fit_end(self, s: FitState) -> None:
        s.checkpoints = {k: self.folder / f"{k}.pt" for k in ("best", "last")}
        best = self.folder / "best.pt"
        if s.best_state is None and best.is_file():  # nothing improved in this call: the best is on disk
            load_weights(s.model, load_checkpoint(best, map_location=s.device))


class History(Callback):
    """``history.csv``: one row per epoch (losses, metrics, learning rate, seconds), rewritten atomically."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / "history.csv"

    def on_epoch_end(self, s: FitState) -> None:
        if s.rank == 0:
            atomic_write_csv(pd.DataFrame(s.history), self.path)


class EarlyStopping(Callback):
    """Stop after ``patience`` validated epochs without a better validation score."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, s: FitState) -> None:
        if s.bad_epochs >= self.patience:
            s.stop, s.stopped_early = f"no better val {s.task.score} in {self.patience} epochs", True


class Deadline(Callback):
    """Stop when the time is up (:mod:`lungs_utils.engine.deadline`): after an epoch, when the next one would
    end after ``at`` (a ``time.time()``; judged by the last epoch's length), or when SIGTERM came during
    its validation. Under torchrun every rank takes rank 0's view, so they stop together."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def on_epoch_end(self, s: FitState) -> None:
        row = s.history[-1]
        last = s.epoch >= s.params["epochs"]  # the part is done: nothing to cut (the next part's deadline judges)
        late = self.at is not None and not last and \
            time.time() + row["train_seconds"] + row.get("val_seconds", 0.0) > self.at
        reason = SIGTERM if sigterm_received() else TIME_LIMIT if late else None
        if s.world > 1:  # one decision for every rank, or the next epoch's collectives would hang
            flag = torch.tensor([0 if reason is None else 1 if reason == TIME_LIMIT else 2], device=s.device)
            reason = (None, TIME_LIMIT, SIGTERM)[int(broadcast_from_first(flag))]
        if reason is not None:
            s.stop = s.cut = reason


class StopAfter(Callback):
    """End this call after ``epochs`` epochs (the schedule still spans ``params['epochs']``): time-boxed
    sessions that resume later."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.first = epochs, 0

    def on_fit_start(self, s: FitState) -> None:
        self.first = s.epoch

    def on_epoch_end(self, s: FitState) -> None:
        if s.epoch - self.first >= self.epochs:
            s.stop = f"stop_after {self.epochs}"


class ProgressBar(Callback):
    """The epochs bar, with the last loss, validation score and best score."""

    def on_fit_start(self, s: FitState) -> None:
        self.bar = bar(desc="epochs", total=s.params["epochs"], initial=s.epoch, disable=s.rank != 0)

    def on_epoch_end(self, s: FitState) -> None:
        score = s.task.score
        shown = {"loss": f"{s.history[-1]['train_loss']:.3f}"}
        if s.validated:
            shown.update({f"val_{score}": f"{s.val_metrics[score]:.3f}", "best": f"{s.best_score:.3f}"})
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def on_fit_end(self, s: FitState) -> None:
        self.bar.close()


class Log(Callback):
    """Say what is not visible in the history: a resume (from where), and why training stopped before
    ``params['epochs']``, with the best epoch kept. Put it after the callbacks that resume or stop."""

    def on_fit_start(self, s: FitState) -> None:
        if s.rank == 0 and s.resumed_from is not None:
            print(f"resuming from {s.resumed_from} after epoch {s.epoch}", flush=True)

    def on_fit_end(self, s: FitState) -> None:
        if s.rank == 0 and s.stop:
            print(f"stopped after epoch {s.epoch} of {s.params['epochs']} ({s.stop}); best epoch {s.best_epoch}: "
                  f"val {s.task.score} {s.best_score:.4f}", flush=True)


class TensorBoard(Callback):
    """TensorBoard event files in ``<run folder>/tb/``: losses, scores and per-class F1 (train and val),
    learning rate, image side, throughput, and the validation confusion matrix as an image. A resumed
    run drops the events of epochs after the checkpoint (``purge_step``), so the curves never fork."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.folder = Path(run_dir) / TB_DIR
        self.writer: Any = None

    def on_fit_start(self, s: FitState) -> None:
        self.first_epoch = s.epoch

    def _open(self, s: FitState) -> Any:
        # Opened at the first epoch's end, not at the start: a run that fails before finishing an
        # epoch leaves no event file, so its folder stays reusable (see paths.RUN_TRACES).
        try:  # imported here: tensorboard costs a second at import, and only training needs it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: the tensorboard package is missing, so this run writes no TensorBoard logs; "
                  "pip install tensorboard, or set tensorboard: false", flush=True)
            return False
        return SummaryWriter(str(self.folder), purge_step=self.first_epoch + 1 if self.first_epoch else None)

    def on_epoch_end(self, s: FitState) -> None:
        if s.rank != 0:
            return
        if self.writer is None:
            self.writer = self._open(s)
        if self.writer is False:
            return
        for tag, value in scalar_tags(s.history[-1]).items():
            self.writer.add_scalar(tag, value, s.epoch)
        cm = s.val_metrics.get("confusion_matrix") if s.validated else None
        if cm is not None:
            from ..stats.plots import confusion_matrix

            fig = confusion_matrix(cm, title=f"Validation confusion matrix, epoch {s.epoch}")
            fig.tight_layout()  # add_figure renders the canvas as is: keep the class names inside it
            self.writer.add_figure("val/confusion_matrix", fig, s.epoch, close=False)
        self.writer.flush()

    def on_fit_end(self, s: FitState) -> None:
        if self.writer:
            self.writer.close()
        self.writer = None


def scalar_tags(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row as TensorBoard tags: ``train_loss`` → ``loss/train``, ``val_f1_covid`` →
    ``f1_covid/val`` (train and val of a metric side by side), the rest under ``run/``."""
    tags = {}
    for key, value in row.items():
        if key == "epoch" or not isinstance(value, (int, float)):
            continue
        split, _, name = key.partition("_")
        if split in ("train", "val") and name not in ("seconds", "size"):
            tags[f"{name}/{split}"] = float(value)
        else:
            tags[f"run/{key}"] = float(value)
    return tags


def default_callbacks(params: Mapping[str, Any], run_dir: str | os.PathLike[str] | None, *,
                      progress: bool = True, stop_after: int | None = None,
                      deadline: float | None = None, also: Sequence[Callback] = ()) -> list[Callback]:
    """What ``fit`` runs unless told otherwise: files only with a run folder; early stopping with
    ``patience``; TensorBoard unless ``tensorboard: false``; the time budget (``deadline``, and SIGTERM);
    then ``also`` (e.g. a sweep trial's report to its study, after the epoch is saved)."""
    callbacks: list[Callback] = []
    if run_dir is not None:
        callbacks += [Checkpoint(run_dir), History(run_dir)]
        if params["tensorboard"]:
            callbacks.append(TensorBoard(run_dir))
    if params["patience"] is not None:
        callbacks.append(EarlyStopping(params["patience"]))
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    callbacks.append(Deadline(deadline))
    callbacks += list(also)
    if progress:
        callbacks.append(ProgressBar())
    return callbacks + [Log()]
