"""The training loop's callbacks: the hook interface, stopping, TensorBoard logs, and fit's length."""

from __future__ import annotations

import inspect
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lungs_utils.engine import callbacks as C
from lungs_utils.engine import loop as T
from lungs_utils.engine import state as St

from test_train import quick, tiny_net, toy_sets


class Recorder(C.Callback):
    """Records every hook call, and stops the loop after ``stop_at`` epochs."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[str, int, bool]] = []
        self.stop_at = stop_at

    def on_fit_start(self, s: St.FitState) -> None:
        self.calls.append(("start", s.epoch, s.improved))

    def on_epoch_end(self, s: St.FitState) -> None:
        assert s.history[-1]["epoch"] == s.epoch and s.val_metrics["macro_f1"] == s.history[-1]["val_macro_f1"]
        self.calls.append(("epoch", s.epoch, s.improved))
        if s.epoch == self.stop_at:
            s.stop = "recorder"

    def on_fit_end(self, s: St.FitState) -> None:
        self.calls.append(("end", s.epoch, s.improved))


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_hooks_are_called_in_order_and_a_callback_can_stop_the_loop(tmp_path: Path) -> None:
    train, val = toy_sets()
    recorder = Recorder(stop_at=2)
    result = T.fit(tiny_net(), train, val, quick(epochs=5), tmp_path, progress=False, callbacks=[recorder])
    assert [c[:2] for c in recorder.calls] == [("start", 0), ("epoch", 1), ("epoch", 2), ("end", 2)]
    assert recorder.calls[1][2] is True  # the first epoch is always an improvement
    assert result.epochs_run == 2 and not result.stopped_early
    # Given callbacks replace the defaults: no checkpoints, history file or TensorBoard logs.
    assert not any(tmp_path.iterdir())


def test_default_callbacks_follow_the_params() -> None:
    names = lambda cbs: [type(c).__name__ for c in cbs]  # noqa: E731
    assert names(C.default_callbacks(quick(), "run")) == ["Checkpoint", "History", "TensorBoard", "Deadline",
                                                          "ProgressBar", "Log"]
    assert names(C.default_callbacks(quick(tensorboard=False, patience=3), "run", progress=False, stop_after=1)) == [
        "Checkpoint", "History", "EarlyStopping", "StopAfter", "Deadline", "Log"]
    assert names(C.default_callbacks(quick(), None, progress=False)) == ["Deadline", "Log"]


def test_tensorboard_logs_every_epoch_and_a_resume_does_not_fork_the_curves(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    train, val = toy_sets()
    p = quick(epochs=3)
    T.fit(tiny_net(), train, val, p, tmp_path, progress=False, stop_after=2)
    assert capsys.readouterr().out.strip() == ("stopped after epoch 2 of 3 (stop_after 2); best epoch "
                                               f"{pd.read_csv(tmp_path / 'history.csv')['val_macro_f1'].idxmax() + 1}: "
                                               f"val macro_f1 {pd.read_csv(tmp_path / 'history.csv')['val_macro_f1'].max():.4f}")
    T.fit(tiny_net(), train, val, {**p, "resume": True}, tmp_path, progress=False)
    assert capsys.readouterr().out.strip() == f"resuming from {tmp_path / 'checkpoints' / 'last.pt'} after epoch 2"
    acc = events(tmp_path / "tb")
    tags = acc.Tags()["scalars"]
    for tag in ("loss/train", "loss/val", "macro_f1/train", "macro_f1/val", "f1_covid/val", "f1_normal/val",
                "run/lr", "run/images_per_s"):
        assert tag in tags, tag
    history = pd.read_csv(tmp_path / "history.csv")
    for tag, column in (("loss/val", "val_loss"), ("macro_f1/val", "val_macro_f1"), ("run/lr", "lr")):
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3], tag
        assert [e.value for e in logged] == pytest.approx(history[column].tolist(), rel=1e-6)
    images = acc.Images("val/confusion_matrix")
    assert [e.step for e in images] == [1, 2, 3] and images[0].width > 100


def test_tensorboard_can_be_turned_off(tmp_path: Path) -> None:
    train, val = toy_sets()
    T.fit(tiny_net(), train, val, quick(epochs=1, tensorboard=False), tmp_path, progress=False)
    assert (tmp_path / "history.csv").is_file() and not (tmp_path / "tb").exists()


def test_scalar_tags_pair_train_and_val_of_a_metric() -> None:
    row = {"epoch": 3, "lr": 0.1, "train_size": 96, "train_loss": 0.5, "val_loss": 0.6, "val_dice": 0.9,
           "train_seconds": 2.0, "val_seconds": 1.0, "images_per_s": 50.0}
    assert C.scalar_tags(row) == {"run/lr": 0.1, "run/train_size": 96.0, "loss/train": 0.5, "loss/val": 0.6,
                                  "dice/val": 0.9, "run/train_seconds": 2.0, "run/val_seconds": 1.0,
                                  "run/images_per_s": 50.0}


def test_fit_reads_on_one_screen() -> None:
    """The loop itself stays short: setup, epochs and files live in start_fit, train_one_epoch, callbacks."""
    assert len(inspect.getsource(T.fit).splitlines()) <= 60
