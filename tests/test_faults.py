"""The fault suite (`make test-faults`): real runs on a small phantom set, broken on purpose.

Every case checks the same promises: nothing finished is lost or replaced by something worse; no file is
visible under its final name half-written; a damaged file is named (rebuilt where it is a cache, refused
where it is a result), never used; a refusal is one ``error:`` line that says what to do.

Runs are real ``lungs train`` processes (one thread each: the same floating-point order in every process,
so a resumed run must match an uninterrupted one bit for bit). Disks that fill up and read-only mounts are
small tmpfs mounts (root only; skipped with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lungs_utils.engine.checkpoint import load_checkpoint
from lungs_utils.errors import LungsError
from lungs_utils.paths import run_product
from lungs_utils.xrays import phantom
from lungs_utils.xrays.submission import validate_submission

pytestmark = pytest.mark.faults

N_TRAIN, N_TEST = 60, 12
BASE = {"model": "resnet_tiny", "image_size": 32, "batch_size": 8, "lr": 0.003, "epochs": 4, "seed": 3,
        "device": "cpu", "audit": False, "tensorboard": False, "warmup_epochs": 0.5}
#: The files a finished classifier run must hold identical after any crash and resume.
PREDICTIONS = ("val_predictions.csv", "test_predictions.csv", "submission.csv")
#: Kill points per run: seeded, spread over the uninterrupted run's duration.
KILLS = 3


# ------------------------------------------------------------------------------------------------ helpers
def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LUNGS_PROGRESS": "off",
            "PYTHONUNBUFFERED": "1", **extra}


def train_args(params: Path, *flags: str, **overrides: object) -> list[str]:
    ps = [a for k, v in overrides.items() for a in ("-p", f"{k}={v}")]
    return [sys.executable, "-m", "lungs_utils", "train", str(params), *ps, *flags]


def lungs(*args: str, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lungs_utils", *args], capture_output=True, text=True,
                          env=env(**extra_env), timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The refusal: status 2 and one ``error:`` line (the last one), holding ``words``; no traceback."""
    said = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said and said[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in said[-1], said[-1]
    return said[-1]


def write_params(path: Path, **values: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**BASE, **values}))
    return path


def no_temp_files(folder: Path) -> None:
    """No temporary file of a write is left behind."""
    left = [p for p in folder.rglob("*.tmp")]
    assert not left, left


def complete_files(folder: Path) -> None:
    """Every file under its final name is whole: checkpoints load, tables and records parse."""
    for path in folder.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def same_predictions(a: Path, b: Path, names: tuple[str, ...] = PREDICTIONS) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def kill_and_resume(args: list[str], folder: Path, seconds: float, seed: int) -> int:
    """Start the run and SIGKILL it at ``KILLS`` seeded points spread over ``seconds`` (each try resumes the
    last), then let it finish with --resume; returns how many kills landed on a running process."""
    rng = random.Random(seed)
    landed = 0
    for k in range(KILLS):
        proc = subprocess.Popen(args + (["--resume"] if k else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env())
        time.sleep(rng.uniform(0.2, 1.0) * seconds)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait(timeout=60)
        if folder.exists():
            complete_files(folder)
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return landed


@pytest.fixture(scope="module")
def ph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom set every case uses (data folder)."""
    root = tmp_path_factory.mktemp("faults")
    phantom.generate(root / "ph", n_train=N_TRAIN, n_test=N_TEST, size=48, seed=11, workers=1)
    return root / "ph" / "data"


@pytest.fixture(scope="module")
def straight(ph: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Uninterrupted runs to compare with: a 3-fold classifier, a single-split one, a 2-fold segmentation."""
    root = tmp_path_factory.mktemp("straight")
    out: dict[str, object] = {"root": root}
    runs = {"cv": ({"cv": 3}, "10_simple_cnn.ipynb"), "single": ({"epochs": 6}, "10_simple_cnn.ipynb"),
            "seg": ({"cv": 2, "model": "unet_small", "epochs": 3}, "05_lung_segmentation.ipynb")}
    for name, (extra, notebook) in runs.items():
        params = write_params(root / f"{name}.yaml", data_dir=str(ph), cache_dir=str(root / "cache"),
                              notebook=notebook, **extra)
        t0 = time.perf_counter()
        done = subprocess.run(train_args(params, output_dir=root / name), capture_output=True, text=True,
                              env=env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = (params, root / name, time.perf_counter() - t0)
    return out


def finished_copy(straight: dict, name: str, where: Path) -> Path:
    """A copy of a finished run to damage."""
    _, folder, _ = straight[name]
    shutil.copytree(folder, where)
    return where


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """``mount(size, ro=False)`` → a fresh tmpfs mount of ``size`` bytes (unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(size: int, name: str = "disk") -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): the disk-full and "
                        "read-only cases need one")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


# ------------------------------------------------------------------------------------------------ SIGKILL, resume
@pytest.mark.parametrize("seed", [1, 2])
def test_a_cv_run_killed_at_random_points_resumes_to_the_same_predictions(straight: dict, tmp_path: Path,
                                                                          seed: int) -> None:
    params, reference, seconds = straight["cv"]
    folder = tmp_path / "cv"
    landed = kill_and_resume(train_args(params, output_dir=folder), folder, seconds, seed)
    assert landed >= 1
    same_predictions(reference, folder, PREDICTIONS + ("oof_predictions.csv",))
    for k in range(3):
        same_predictions(reference / f"fold_{k}", folder / f"fold_{k}", ("val_predictions.csv", "test_predictions.csv"))
    no_temp_files(folder)


@pytest.mark.parametrize("seed", [3, 4])
def test_a_segmentation_run_killed_at_random_points_resumes_to_the_same_masks(straight: dict, tmp_path: Path,
                                                                              seed: int) -> None:
    params, reference, seconds = straight["seg"]
    folder = tmp_path / "seg"
    assert kill_and_resume(train_args(params, output_dir=folder), folder, seconds, seed) >= 1
    for part in ("test", "train_oof"):
        a = {p.name: p.read_bytes() for p in (reference / "masks" / part).iterdir()}
        b = {p.name: p.read_bytes() for p in (folder / "masks" / part).iterdir()}
        assert a == b, part
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (reference, folder))
    assert mb["val_dice"] == ma["val_dice"]


# ------------------------------------------------------------------------------------------------ signals
def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not path.is_file():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path} after {limit} s"
        time.sleep(0.02)


def signal_after_first_epoch(params: Path, folder: Path, sig: int) -> subprocess.Popen:
    """Start the run and send ``sig`` once its first checkpoint is on disk; returns the ended process with
    its output read (``.out``, ``.err``)."""
    proc = subprocess.Popen(train_args(params, output_dir=folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    _wait_for(folder / "checkpoints" / "last.pt", proc)
    proc.send_signal(sig)
    proc.out, proc.err = proc.communicate(timeout=120)
    return proc


def resume_to_the_same_result(params: Path, folder: Path, reference: Path) -> None:
    done = subprocess.run(train_args(params, "--resume", output_dir=folder), capture_output=True, text=True,
                          env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    same_predictions(reference, folder)


def test_sigterm_stops_at_a_clean_point_with_a_submission_and_a_resume_finishes_the_same(
        straight: dict, ph: Path, tmp_path: Path) -> None:
    params, reference, _ = straight["single"]
    folder = tmp_path / "run"
    proc = signal_after_first_epoch(params, folder, signal.SIGTERM)
    out, err = proc.out, proc.err
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: the time is up" in out
    record = json.loads((folder / "metrics.json").read_text())["time_limit"]
    assert record["cut"] == "SIGTERM" and record["parts_used"] == [0] and "of 6" in record["skipped"]
    test_ids = sorted(int(p.stem[4:]) for p in (ph / "test_images").glob("img_*.png"))
    assert len(validate_submission(folder / "submission.csv", test_ids)) == N_TEST
    assert not (folder / ".lock").exists()
    resume_to_the_same_result(params, folder, reference)
    assert json.loads((folder / "metrics.json").read_text())["time_limit"] is None  # the whole recipe now


def test_ctrl_c_stops_with_one_line_and_the_run_resumes_to_the_same_result(straight: dict, tmp_path: Path) -> None:
    params, reference, _ = straight["single"]
    folder = tmp_path / "run"
    proc = signal_after_first_epoch(params, folder, signal.SIGINT)
    err = proc.err
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted after"), err[-2000:]
    assert "Traceback" not in err and not (folder / ".lock").exists() and not (folder / "metrics.json").exists()
    resume_to_the_same_result(params, folder, reference)


def test_a_time_limit_too_small_ends_on_time_with_a_submission_and_says_what_it_skipped(
        ph: Path, tmp_path: Path) -> None:
    limit = 0.4  # minutes; the recipe needs several times that
    params = write_params(tmp_path / "p.yaml", data_dir=str(ph), cache_dir=str(tmp_path / "cache"), cv=3,
                          epochs=200, time_limit=limit)
    t0 = time.perf_counter()
    done = subprocess.run(train_args(params, output_dir=tmp_path / "run"), capture_output=True, text=True,
                          env=env(), timeout=300)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: time_limit 0.4 min: this recipe needs about" in done.stdout
    assert "time_limit: the time is up" in done.stdout
    assert wall < limit * 60 + 15, wall  # the limit counts from the run's start; Python and torch take a few s
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["time_limit"]
    assert record["cut"] == "time_limit" and record["minutes"] == limit and "of 200" in record["skipped"]
    assert "not trained" in record["skipped"] or len(record["parts_used"]) == 3
    test_ids = sorted(int(p.stem[4:]) for p in (ph / "test_images").glob("img_*.png"))
    assert len(validate_submission(tmp_path / "run" / "submission.csv", test_ids)) == N_TEST
    done = lungs("leaderboard", LUNGS_OUTPUTS=str(tmp_path))
    assert done.returncode == 0 and "time_limit: " in pd.read_csv(tmp_path / "leaderboard.csv")["time_cut"].iloc[0]


# ------------------------------------------------------------------------------------------------ concurrency
@contextlib.contextmanager
def running(params: Path, folder: Path) -> Iterator[subprocess.Popen]:
    """A long run holding ``folder`` (its lock taken) for the block; killed afterwards."""
    # Far more epochs than the block can see end, so the run still holds the folder at the block's last step.
    first = subprocess.Popen(train_args(params, output_dir=folder, epochs=100_000), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env())
    try:
        _wait_for(folder / ".lock", first)
        yield first
        assert first.poll() is None, f"the holding run ended (status {first.returncode}) inside the block"
    finally:
        first.kill()
        first.wait()


def test_the_same_run_started_twice_is_refused_with_who_holds_it(straight: dict, tmp_path: Path) -> None:
    params, _, _ = straight["single"]
    folder = tmp_path / "run"
    with running(params, folder) as first:
        second = subprocess.run(train_args(params, output_dir=folder), capture_output=True, text=True, env=env(),
                                timeout=120)
        one_error_line(second, "already running", f"pid {first.pid}")
        # The notebook's first cell on the same folder (what JupyterLab's Run All does) is refused the same way.
        from lungs_utils import params as P
        from lungs_utils.runs import experiment

        with pytest.raises(LungsError, match=f"already running \\(pid {first.pid}"):
            experiment.prepare(P.load(params, {"output_dir": str(folder), "resume": True}), progress=False)


def test_two_runs_building_one_cache_at_once_both_succeed(ph: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path / "p.yaml", data_dir=str(ph), cache_dir=str(tmp_path / "cache"), epochs=1)
    procs = [subprocess.Popen(train_args(params, output_dir=tmp_path / f"run{k}"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env()) for k in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    same_predictions(tmp_path / "run0", tmp_path / "run1")  # the same cache, the same numbers
    assert len(list((tmp_path / "cache").rglob("train-*.ids.npy"))) == 1
    no_temp_files(tmp_path / "cache")


def test_a_stale_lock_is_taken_over_and_a_foreign_one_is_refused(straight: dict, tmp_path: Path) -> None:
    params, _, _ = straight["single"]
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    done = subprocess.run(train_args(params, output_dir=folder, epochs=1), capture_output=True, text=True,
                          env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "submission.csv").is_file() and not (folder / ".lock").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    one_error_line(lungs("train", str(params), "-p", f"output_dir={other}"), "already running")


# ------------------------------------------------------------------------------------------------ disks
def test_a_cache_that_does_not_fit_is_one_line_and_leaves_no_partial_cache(ph: Path, tmp_path: Path, tmpfs) -> None:
    disk = tmpfs(256 << 10)
    params = write_params(tmp_path / "p.yaml", data_dir=str(ph), cache_dir=str(disk / "cache"), epochs=1)
    one_error_line(lungs("train", str(params), "-p", f"output_dir={tmp_path / 'run'}"),
                   "not enough disk space for the image cache")
    assert not list((disk / "cache").rglob("*.npy"))
    assert run_product(tmp_path / "run") is None  # at most the traces of a start: the same command reuses it


def test_a_run_that_does_not_fit_is_refused_before_it_starts_with_the_figure(ph: Path, tmp_path: Path,
                                                                             tmpfs) -> None:
    disk = tmpfs(4 << 20)
    params = write_params(tmp_path / "p.yaml", data_dir=str(ph), cache_dir=str(tmp_path / "cache"), cv=3,
                          model="resnet18")
    line = one_error_line(lungs("train", str(params), "-p", f"output_dir={disk / 'run'}"), "needs about", "MB are free")
    assert "3 model(s)" in line
    assert run_product(disk / "run") is None


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_resumes_after(straight: dict, tmp_path: Path,
                                                                             tmpfs) -> None:
    params, reference, _ = straight["single"]
    disk = tmpfs(48 << 20)
    folder = disk / "run"
    proc = subprocess.Popen(train_args(params, output_dir=folder), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env())
    last = folder / "checkpoints" / "last.pt"
    _wait_for(last, proc)
    filler = disk / "filler"
    with open(filler, "wb") as fh:  # the disk fills up, as another job's output would
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
    _, err = proc.communicate(timeout=120)
    said = err.strip().splitlines()
    assert proc.returncode == 2 and said[-1].startswith("error: the disk holding") and "is full" in said[-1], err[-2000:]
    assert "Traceback" not in err
    assert load_checkpoint(last)["epoch"] >= 1  # the last good checkpoint is intact
    no_temp_files(folder)
    filler.unlink()
    resume_to_the_same_result(params, folder, reference)


def test_predictions_written_to_a_full_disk_are_one_line_and_keep_the_old_file(tmpfs) -> None:
    from lungs_utils.xrays.submission import test_frame, write_predictions

    disk = tmpfs(1 << 20)
    ids = np.arange(10)
    write_predictions(disk, test=test_frame(ids, np.full((10, 3), 1 / 3)))
    before = (disk / "test_predictions.csv").read_bytes()
    (disk / "filler").write_bytes(b"\0" * ((1 << 20) - 8192))
    many = np.arange(200_000)
    with pytest.raises(LungsError, match="is full"):
        write_predictions(disk, test=test_frame(many, np.full((len(many), 3), 1 / 3)))
    assert (disk / "test_predictions.csv").read_bytes() == before
    no_temp_files(disk)


def test_read_only_data_works_and_read_only_outputs_are_refused_up_front(ph: Path, tmp_path: Path, tmpfs) -> None:
    data = tmpfs(64 << 20, "data")
    shutil.copytree(ph, data / "data")
    (data / "PHANTOM.md").write_text((ph.parent / "PHANTOM.md").read_text())
    read_only(data)
    params = write_params(tmp_path / "p.yaml", data_dir=str(data / "data"), cache_dir=str(tmp_path / "cache"),
                          epochs=1)
    done = lungs("train", str(params), "-p", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = tmpfs(1 << 20, "outputs")
    read_only(outputs)
    one_error_line(lungs("train", str(params), "-p", f"output_dir={outputs / 'run'}"), "cannot write the run folder",
                   "writable")


# ------------------------------------------------------------------------------------------------ damaged files
def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_damaged_last_checkpoint_is_named_and_nothing_is_written(straight: dict, tmp_path: Path) -> None:
    params, _, _ = straight["single"]
    folder = finished_copy(straight, "single", tmp_path / "run")
    _cut(folder / "checkpoints" / "last.pt")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    one_error_line(lungs("train", str(params), "-p", f"output_dir={folder}", "--resume"), "last.pt",
                   "is not a lungs checkpoint")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_damaged_best_checkpoint_is_named_by_predict(straight: dict, ph: Path, tmp_path: Path) -> None:
    folder = finished_copy(straight, "single", tmp_path / "run")
    _cut(folder / "checkpoints" / "best.pt")
    one_error_line(lungs("predict", str(folder), str(ph / "test_images"), "--out", str(tmp_path / "p")), "best.pt",
                   "is not a lungs checkpoint")
    assert not (tmp_path / "p").exists()


def test_a_fold_missing_its_best_checkpoint_is_named(straight: dict, ph: Path, tmp_path: Path) -> None:
    folder = finished_copy(straight, "cv", tmp_path / "run")
    (folder / "fold_1" / "checkpoints" / "best.pt").unlink()
    one_error_line(lungs("predict", str(folder), str(ph / "test_images"), "--out", str(tmp_path / "p")),
                   "fold_1/checkpoints/best.pt is missing")
    one_error_line(lungs("audit", str(folder)), "fold_<k>")


def test_a_damaged_cache_array_is_rebuilt(straight: dict, tmp_path: Path) -> None:
    params, reference, _ = straight["single"]
    cache = tmp_path / "cache"
    shutil.copytree(straight["root"] / "cache", cache)
    arrays = [p for p in cache.rglob("train-*.npy") if not p.name.endswith(".ids.npy")]
    assert arrays
    size = arrays[0].stat().st_size
    _cut(arrays[0], 0.3)
    done = subprocess.run(train_args(params, output_dir=tmp_path / "run", cache_dir=cache), capture_output=True,
                          text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert arrays[0].stat().st_size == size  # rebuilt whole
    same_predictions(reference, tmp_path / "run")


@pytest.mark.parametrize("name", ["run.json", "metrics.json", "history.csv"])
def test_a_damaged_record_neither_hides_the_leaderboard_nor_is_used(straight: dict, tmp_path: Path,
                                                                     name: str) -> None:
    outputs = tmp_path / "outputs"
    folder = finished_copy(straight, "single", outputs / "run")
    finished_copy(straight, "cv", outputs / "other")
    (folder / name).write_text("{ not what it should be")
    done = lungs("leaderboard", LUNGS_OUTPUTS=str(outputs))
    assert done.returncode == 0, done.stderr[-2000:]
    board = pd.read_csv(outputs / "leaderboard.csv").set_index("run")
    assert "other" in board.index
    if name == "metrics.json":  # no score to rank: named, and the run left out rather than shown without one
        assert "run" not in board.index and "metrics.json is damaged" in done.stderr
    else:
        score = json.loads((straight["single"][1] / "metrics.json").read_text())["val_macro_f1"]
        assert board.loc["run", "val_macro_f1"] == pytest.approx(score, abs=1e-4)
    if name == "history.csv":
        # Named; its figures come from metrics.json instead, never from the damaged file.
        assert "history.csv is damaged" in done.stderr and board.loc["run", "epochs"] == 6


@pytest.mark.parametrize("name", ["val_predictions.csv", "oof_predictions.csv", "test_predictions.csv"])
def test_a_member_with_a_cut_prediction_table_is_refused_by_ensemble(straight: dict, tmp_path: Path,
                                                                    name: str) -> None:
    a = finished_copy(straight, "cv", tmp_path / "a")
    b = finished_copy(straight, "cv", tmp_path / "b")
    path = b / name
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    one_error_line(lungs("ensemble", str(a), str(b), "--out", str(tmp_path / "ens")), str(path))
    assert not (tmp_path / "ens").exists()


def test_a_cut_validation_table_is_named_by_the_leaderboard_and_not_compared(straight: dict, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    finished_copy(straight, "cv", outputs / "a")
    b = finished_copy(straight, "cv", outputs / "b")
    lines = (b / "val_predictions.csv").read_text().splitlines()
    (b / "val_predictions.csv").write_text("\n".join(lines[:10]) + "\n")
    done = lungs("leaderboard", LUNGS_OUTPUTS=str(outputs))
    assert done.returncode == 0 and "val_predictions.csv: 9 rows for the 60 images" in done.stderr, done.stderr
    board = pd.read_csv(outputs / "leaderboard.csv").set_index("run")
    assert pd.isna(board.loc["b", "gap_to_best"]) and board.loc["a", "vs_best"] != "best"  # nothing to pair with


def test_a_damaged_split_is_named_when_a_run_is_reopened(straight: dict, tmp_path: Path) -> None:
    folder = finished_copy(straight, "cv", tmp_path / "run")
    (folder / "split.csv").write_text("garbage\n")
    one_error_line(lungs("audit", str(folder)), "split.csv", "damaged")


def test_a_damaged_params_file_of_a_run_is_named(straight: dict, ph: Path, tmp_path: Path) -> None:
    folder = finished_copy(straight, "single", tmp_path / "run")
    (folder / "params.yaml").write_text("model: [unclosed\n")
    one_error_line(lungs("predict", str(folder), str(ph / "test_images"), "--out", str(tmp_path / "p")),
                   "params.yaml")


def test_lungs_run_on_the_name_of_a_running_run_is_refused(straight: dict, ph: Path, tmp_path: Path) -> None:
    params, _, _ = straight["single"]
    folder = tmp_path / "run"
    with running(params, folder):
        for flag in ((), ("--resume",), ("--overwrite",)):
            one_error_line(lungs("run", str(params), "-p", f"output_dir={folder}", *flag), "already running")


@pytest.mark.parametrize("name", ["polarity.json", "ensemble.json"])
def test_a_damaged_detector_or_ensemble_record_is_refused_by_predict(straight: dict, ph: Path, tmp_path: Path,
                                                                    name: str) -> None:
    outputs = tmp_path / "outputs"
    folder = finished_copy(straight, "cv", outputs / "cv")
    if name == "ensemble.json":
        other = finished_copy(straight, "cv", outputs / "cv2")
        assert lungs("ensemble", str(folder), str(other), "--out", str(outputs / "ens")).returncode == 0
        folder = outputs / "ens"
    assert (folder / name).is_file()
    (folder / name).write_text("{}")
    one_error_line(lungs("predict", str(folder), str(ph / "test_images"), "--out", str(tmp_path / "p"),
                         LUNGS_OUTPUTS=str(outputs)), name, "damaged")
    assert not (tmp_path / "p").exists()


def test_a_damaged_predicted_mask_is_named_by_the_classifier_that_reads_it(straight: dict, ph: Path,
                                                                          tmp_path: Path) -> None:
    seg = finished_copy(straight, "seg", tmp_path / "seg")
    broken = sorted((seg / "masks" / "test").glob("img_*.png"))[2]
    broken.write_bytes(broken.read_bytes()[:30])
    params = write_params(tmp_path / "p.yaml", data_dir=str(ph), cache_dir=str(tmp_path / "cache"), epochs=1,
                          masks="channel", mask_run=str(seg))
    one_error_line(lungs("train", str(params), "-p", f"output_dir={tmp_path / 'run'}"), broken.name)
    assert run_product(tmp_path / "run") is None
