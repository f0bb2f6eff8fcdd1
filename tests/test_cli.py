"""The `lungs` command: sub-commands work, user errors are one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungs_utils.app.cli import main


def lungs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lungs_utils", *args], capture_output=True, text=True,
                          cwd=cwd, env=os.environ.copy())


def test_help_lists_the_commands() -> None:
    out = lungs("--help")
    assert out.returncode == 0
    for command in ("demo", "phantom", "download", "run", "pipeline", "train"):
        assert command in out.stdout


def test_phantom_command_writes_the_layout(tmp_path: Path) -> None:
    out = lungs("phantom", str(tmp_path / "ph"), "--train", "9", "--test", "3", "--size", "48")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ph" / "data" / "train_answers.csv").is_file()
    assert (tmp_path / "ph" / "test_answers.csv").is_file()
    assert len(list((tmp_path / "ph" / "data" / "train_lung_masks").glob("img_*.png"))) == 9
    again = lungs("phantom", str(tmp_path / "ph"), "--train", "9", "--test", "3", "--size", "48")
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and len(again.stderr.strip().splitlines()) == 1
    assert "--overwrite" in again.stderr


def test_user_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["phantom", str(tmp_path / "x"), "--size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "size" in err


def test_download_without_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download"]) == 2
    err = capsys.readouterr().err
    assert "no Kaggle credentials" in err and "Traceback" not in err


def test_score_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "truth.csv").write_text("id,target_feature\n1,0\n2,1\n3,2\n4,2\n")
    (tmp_path / "sub.csv").write_text("id,target_feature\n1,0\n2,1\n3,2\n4,1\n")
    assert main(["score", str(tmp_path / "sub.csv"), "--answers", str(tmp_path / "truth.csv")]) == 0
    out = capsys.readouterr().out
    assert "accuracy 0.7500" in out and "(95% CI " in out


def test_score_compares_submissions_paired_on_the_same_images(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    good = np.where(rng.random(300) < 0.9, truth, (truth + 1) % 3)
    worse = good.copy()
    worse[np.flatnonzero(good == truth)[:40]] = (truth[np.flatnonzero(good == truth)[:40]] + 2) % 3
    for name, labels in (("truth", truth), ("good", good), ("worse", worse), ("same", good)):
        pd.DataFrame({"id": np.arange(300), "target_feature": labels}).to_csv(tmp_path / f"{name}.csv", index=False)
    files = [str(tmp_path / f"{n}.csv") for n in ("good", "worse", "same")]
    assert main(["score", *files, "--answers", str(tmp_path / "truth.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and all("(95% CI" in line for line in out[:3]) and out[0].endswith("good.csv")
    assert "worse.csv vs" in out[3] and "behind: -" in out[3] and "paired over the same 300 images" in out[3]
    assert "same.csv vs" in out[4] and "within noise: +0.000" in out[4]
    # The same file twice: the second is compared with the first, not taken for it.
    assert main(["score", files[0], files[0], "--answers", str(tmp_path / "truth.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "good.csv vs" in out[2] and "within noise: +0.000" in out[2]


def test_submit_without_credentials_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub.csv").write_text("id,target_feature\n1,0\n2,1\n")
    assert main(["submit", str(tmp_path / "sub.csv"), "-m", "first try"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "no Kaggle credentials" in err


PROBE = ("import sys\nfrom lungs_utils.app.cli import main\n"
         "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
         "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")


def test_commands_that_neither_train_nor_predict_do_not_import_torch(tmp_path: Path) -> None:
    """`lungs score` of a 200-row file once took 10 s and 860 MB, all of it importing PyTorch."""
    assert lungs("phantom", str(tmp_path / "ph"), "--train", "9", "--test", "20", "--size", "32").returncode == 0
    truth = tmp_path / "ph" / "test_answers.csv"
    root = Path(__file__).resolve().parents[1]
    commands = [["score", str(truth), "--answers", str(truth)], ["leaderboard"], ["report"],
                ["submit", str(truth), "-m", "x", "--data", str(tmp_path / "ph" / "data")],
                ["kaggle-kernel", str(root / "params" / "10_simple_cnn.yaml"), "--out", str(tmp_path / "k"),
                 "--user", "someone"]]
    for argv in commands:
        out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                             env=os.environ.copy())
        assert out.stderr.splitlines()[-1] == "no torch", (argv, out.stderr[-800:])
    assert (tmp_path / "k" / "kernel-metadata.json").is_file()  # the bundle was really written


def test_bundle_reads_the_same_model_names_as_the_registry() -> None:
    from lungs_utils import models
    from lungs_utils.competition import bundle

    assert bundle.model_names() == models.names()
