"""Run folders: a run is never written over by accident — not by a notebook run in JupyterLab, not by
plain papermill, not by `lungs train` — and a start that produced nothing never blocks its own rerun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lungs_utils.runs import experiment as E
from lungs_utils import params as P
from lungs_utils import paths
from lungs_utils.runs import segmentation as S
from lungs_utils.errors import LungsError
from lungs_utils.paths import CLAIMED_ENV

from conftest import snapshot


def quick(data: Path, out: Path, **kw) -> dict:
    base = dict(data_dir=str(data), output_dir=str(out), model="simple_cnn", image_size=32, epochs=1,
                batch_size=4, device="cpu", val_fraction=0.34)
    base.update(kw)
    return P.load(overrides=base)


@pytest.fixture
def finished(tiny_data: Path, tmp_path: Path) -> tuple[dict, Path]:
    """A finished classification run (checkpoints, metrics, submission) in tmp_path/run."""
    p = quick(tiny_data, tmp_path / "run")
    E.run(p, progress=False)
    assert (tmp_path / "run" / "metrics.json").is_file()
    return p, tmp_path / "run"


def test_a_finished_run_is_refused_with_the_options_and_left_untouched(finished) -> None:
    p, run = finished
    before = snapshot(run)
    with pytest.raises(LungsError) as info:
        E.prepare(p, progress=False)  # what a notebook's "Run All" does
    message = str(info.value)
    assert "already holds a run" in message and "resume = True" in message and "overwrite = True" in message
    assert "another run_name" in message and "\n" not in message
    assert snapshot(run) == before


def test_overwrite_replaces_the_old_run_and_resume_continues_it(finished) -> None:
    p, run = finished
    (run / "notes-of-the-old-run.txt").write_text("old")
    exp = E.prepare({**p, "resume": True}, progress=False)
    assert (run / "notes-of-the-old-run.txt").exists() and (run / "checkpoints" / "last.pt").exists()
    assert exp.run_dir == run
    E.prepare({**p, "overwrite": True}, progress=False)
    assert not (run / "notes-of-the-old-run.txt").exists() and not (run / "checkpoints").exists()
    assert sorted(f.name for f in run.iterdir()) == ["params.yaml", "split.csv"]


def test_a_start_that_produced_nothing_is_reused(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("params.yaml", "split.csv", "run.json", "10_simple_cnn.ipynb"):
        (run / name).write_text("left by a crash right after prepare")
    E.prepare(quick(tiny_data, run), progress=False)
    assert sorted(f.name for f in run.iterdir()) == ["params.yaml", "split.csv"]
    assert "crash" not in (run / "params.yaml").read_text()


def test_the_command_that_claimed_the_folder_may_write_it(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    p, run = finished
    monkeypatch.setenv(CLAIMED_ENV, str(run))  # as `lungs run` sets it for its kernel
    assert E.prepare(p, progress=False).run_dir == run
    monkeypatch.setenv(CLAIMED_ENV, str(run.parent / "another"))
    with pytest.raises(LungsError, match="already holds a run"):
        E.prepare(p, progress=False)


def test_segmentation_and_the_other_notebooks_follow_the_same_rules(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    (run / "masks" / "test").mkdir(parents=True)
    (run / "masks" / "test" / "img_1.png").write_bytes(b"a mask of an earlier run")
    with pytest.raises(LungsError, match="already holds a run"):
        S.prepare(quick(tiny_data, run, model="unet_small", cv=2), progress=False)
    # data / ensemble / leaderboard notebooks: paths.make_run_dir before their first write
    board = tmp_path / "board"
    (board / "plots").mkdir(parents=True)
    (board / "plots" / "leaderboard_f1.png").write_bytes(b"png")
    values = P.load(overrides=dict(output_dir=str(board), notebook="95_leaderboard.ipynb"))
    with pytest.raises(LungsError, match=r"already holds a run \(plots"):
        paths.make_run_dir(values)
    assert paths.make_run_dir({**values, "overwrite": True}) == board and not (board / "plots").exists()


def test_a_live_run_of_the_same_name_is_never_touched(finished) -> None:
    p, run = finished
    (run / paths.LOCK_FILE).write_text(f'{{"pid": {os.getpid()}, "host": "{__import__("socket").gethostname()}"}}')
    for extra in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(LungsError, match="is already running"):
            E.prepare({**p, **extra}, progress=False)


def test_an_unwritable_outputs_folder_is_one_line(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    blocked = tmp_path / "outputs"
    blocked.write_text("a file where the outputs folder should be")
    with pytest.raises(LungsError, match=r"cannot write the run folder .*outputs/x .*writable folder"):
        paths.make_run_dir(P.load(overrides=dict(output_dir=str(blocked / "x"))))

    def denied(self, *args, **kwargs):  # what a read-only mount answers (root ignores chmod in tests)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(LungsError, match=r"cannot write the run folder .* \(Permission denied\); make it writable"):
        paths.make_run_dir(P.load(overrides=dict(output_dir=str(tmp_path / "ro"))))


def test_commands_name_the_folder_that_is_not_writable(tiny_data: Path, tmp_path: Path, monkeypatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lungs_utils.analysis import leaderboard
    from lungs_utils.app.cli import main

    outputs = tmp_path / "outputs"
    outputs.write_text("not a folder")
    monkeypatch.setenv("LUNGS_OUTPUTS", str(outputs))
    spec = tmp_path / "p.yaml"
    spec.write_text(f"notebook: 10_simple_cnn.ipynb\nrun_name: x\ndata_dir: {tiny_data}\nepochs: 1\nimage_size: 32\n")
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the run folder") and str(outputs / "x") in err and err.count("\n") == 1

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "leaderboard.csv"))

    monkeypatch.setattr(leaderboard, "write", read_only)
    monkeypatch.setenv("LUNGS_OUTPUTS", str(tmp_path / "ro"))
    (tmp_path / "ro").mkdir()
    assert main(["leaderboard"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {tmp_path / 'ro' / 'leaderboard.csv'} (Permission denied); make it "
                   "writable, or set LUNGS_OUTPUTS (or output_dir) to a writable folder\n")
