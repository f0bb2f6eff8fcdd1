"""Crash safety end to end: a ``lungs train`` process killed (SIGKILL) in the middle of an epoch, after
its first checkpoint, resumes from ``checkpoints/last.pt`` and ends with exactly the history, metrics and
predictions of an uninterrupted run with the same params (CPU, fixed seed).

Everything runs in real subprocesses, as a user's crash would: the kill gives the process no chance to
clean up, so only what is on disk at that moment counts. A second, in-process test covers DataLoader
worker processes (``num_workers > 0``), whose seeding touches the global RNG.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lungs_utils.xrays import phantom
from lungs_utils.engine import loop as T
from lungs_utils.engine import checkpoint as Ck
from lungs_utils.paths import outputs_dir

EPOCHS = 5
#: history.csv columns and metrics.json keys that differ by design: wall times and the run's name.
TIMING_COLUMNS = ["train_seconds", "val_seconds", "images_per_s"]
NOT_COMPARED = {"train_seconds", "train_images_per_s", "predict_seconds", "run_name"}
#: Files whose bytes must match between the uninterrupted and the resumed run.
SAME_BYTES = ("split.csv", "val_predictions.csv", "test_predictions.csv", "submission.csv")


def _env() -> dict[str, str]:
    # One thread: modest CPU use, and the same floating-point reduction order in every process.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LUNGS_PROGRESS": "off",
            "PYTHONUNBUFFERED": "1"}


def _train_command(params_file: Path, *overrides: str) -> list[str]:
    args = [a for o in overrides for a in ("-p", o)]
    return [sys.executable, "-m", "lungs_utils", "train", str(params_file), *args]


def _train(params_file: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(_train_command(params_file, *overrides), capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _kill_after_first_checkpoint(params_file: Path, run_dir: Path, *overrides: str) -> None:
    """Start a run, wait for ``checkpoints/last.pt``, then SIGKILL it partway through the next epoch."""
    last = run_dir / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_train_command(params_file, *overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not last.is_file():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoints/last.pt after 240 s")
            time.sleep(0.01)
        first_seen = last.stat().st_mtime
        # Into epoch 2's training steps (an epoch here takes ~1 s on an idle core), well before its end.
        time.sleep(0.3)
        assert proc.poll() is None, "the run finished before it could be killed: make the epochs longer"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    # The kill landed mid-run: epoch 1 is on disk, epoch 2 never finished.
    state = Ck.load_checkpoint(last)
    assert state["epoch"] == 1 and last.stat().st_mtime == first_seen
    assert len(pd.read_csv(run_dir / "history.csv")) == 1
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "submission.csv").exists()


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    phantom.generate(tmp_path / "ph", n_train=720, n_test=30, size=64, seed=3)
    params_file = tmp_path / "crash.yaml"
    params_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "ph" / "data"), "model": "resnet_tiny", "image_size": 64,
        "epochs": EPOCHS, "batch_size": 16, "lr": 0.003, "seed": 7, "device": "cpu",
        "mixup": 0.2, "equalize": 0.2,  # every random stream (augment, mix, loader order) must resume
    }))
    straight_dir, crashed_dir = outputs_dir() / "straight", outputs_dir() / "crashed"

    _train(params_file, "run_name=straight")
    _kill_after_first_checkpoint(params_file, crashed_dir, "run_name=crashed")
    resumed = _train(params_file, "run_name=crashed", "resume=true")
    assert "resuming from" in resumed.stdout and "after epoch 1" in resumed.stdout

    # History: every epoch, every learned number equal (timings aside).
    a = pd.read_csv(straight_dir / "history.csv").drop(columns=TIMING_COLUMNS)
    b = pd.read_csv(crashed_dir / "history.csv").drop(columns=TIMING_COLUMNS)
    assert list(b["epoch"]) == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a["train_loss"].nunique() == EPOCHS  # training really moved: the comparison means something

    # metrics.json: val macro-F1, confusion matrix, per-class scores, best epoch.
    ma = json.loads((straight_dir / "metrics.json").read_text())
    mb = json.loads((crashed_dir / "metrics.json").read_text())
    assert mb["val_macro_f1"] == ma["val_macro_f1"]
    assert mb["confusion_matrix"] == ma["confusion_matrix"]
    for m in (ma, mb):
        m["audit"].pop("seconds")  # the audit's figures must match too, not its duration
    assert {k: v for k, v in mb.items() if k not in NOT_COMPARED} == \
        {k: v for k, v in ma.items() if k not in NOT_COMPARED}
    assert mb["epochs_run"] == EPOCHS

    # Predictions, submission and final weights: identical.
    for name in SAME_BYTES:
        assert (crashed_dir / name).read_bytes() == (straight_dir / name).read_bytes(), name
    wa = Ck.load_checkpoint(straight_dir / "checkpoints" / "last.pt")["model"]
    wb = Ck.load_checkpoint(crashed_dir / "checkpoints" / "last.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact_with_loader_workers(tmp_path: Path) -> None:
    """The same kill-and-resume, in process (``stop_after`` ends the first session after epoch 1), with a
    worker process loading batches and mixup drawing from the global RNG."""
    from torch import nn

    from lungs_utils import params as P
    from lungs_utils.xrays.data import XrayDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 90, (48, 24, 24), dtype=np.uint8)
    labels = np.arange(48) % 3
    for i, c in enumerate(labels):
        images[i, c * 8:(c + 1) * 8] += 140
    ids = np.arange(48) + 1000
    train = XrayDataset(images, ids, labels, indices=np.arange(36))
    val = XrayDataset(images, ids, labels, indices=np.arange(36, 48))
    params = P.load(overrides=dict(epochs=3, batch_size=12, image_size=24, seed=0, device="cpu",
                                   num_workers=1, mixup=0.2))

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, 3))

    straight = T.fit(net(), train, val, params, tmp_path / "straight", progress=False)
    T.fit(net(), train, val, params, tmp_path / "resumed", progress=False, stop_after=1)
    resumed = T.fit(net(), train, val, {**params, "resume": True}, tmp_path / "resumed", progress=False)
    pd.testing.assert_frame_equal(straight.history.drop(columns=TIMING_COLUMNS),
                                  resumed.history.drop(columns=TIMING_COLUMNS))
