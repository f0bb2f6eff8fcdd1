"""The `lungs` command: sub-commands work, user errors are one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lungs_utils.cli import main


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
    assert "accuracy 0.7500" in capsys.readouterr().out


def test_submit_without_credentials_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub.csv").write_text("id,target_feature\n1,0\n2,1\n")
    assert main(["submit", str(tmp_path / "sub.csv"), "-m", "first try"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "no Kaggle credentials" in err
