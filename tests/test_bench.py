"""The benchmark scripts that are meant to run elsewhere (bench/competition.py on a GPU machine): their
CPU dry run, at the tiniest settings, so they are known to work before a GPU's time is spent on them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lungs_utils.hardware import describe_cpu

ROOT = Path(__file__).resolve().parents[1]


def fake_nvidia_smi(folder: Path, percent: int) -> dict[str, str]:
    """An environment whose ``nvidia-smi`` streams ``percent`` every 20 ms, as ``-lms`` does (faster, so a
    0.3 s epoch still gets samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nwhile true; do echo {percent}; sleep 0.02; done\n")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_competition_dry_run_reports_every_stage(tmp_path: Path) -> None:
    scratch = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "bench" / "competition.py"), "--dry-run", "--n", "60", "--n-test", "20",
               "--epochs", "1", "--size", "64", "--data", str(scratch), "-p", "image_size=64",
               "-p", "batch_size=16", "-p", "device=cpu"]
    env = fake_nvidia_smi(tmp_path / "bin", 37)  # the GPU sampling path, on any machine
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()

    def line(prefix: str) -> str:
        found = [ln for ln in lines if ln.startswith(prefix)]
        assert len(found) == 1, f"{prefix!r} in:\n{out.stdout}"
        return found[0]

    assert describe_cpu() in line("machine: ")
    device = line("run device: ")
    assert device.startswith("run device: cpu (") and "resnet18 at 64 px, batch 16, 1 epochs" in device
    assert "phantom 60 train / 20 test at 64 px" in line("data: ") and "generated in" in line("data: ")
    assert line("cache build").endswith(" s")
    assert "median of the rest n/a (one epoch)" in line("epoch time (train + val): first ")
    assert line("prediction (validation + test, TTA on): ").endswith(" s")
    assert "whole recipe (cache build + lungs train): " in line("lungs train wall: ")
    busy = line("GPU busy: ")
    assert busy.startswith("GPU busy: 37 % (") and "during the epochs, 37 % (" in busy
    assert line("target (GPU): ") == "target (GPU): not checked: the run was not on a GPU"
    run = scratch / "outputs" / "competition"
    assert len(pd.read_csv(run / "history.csv")) == 1 and (run / "metrics.json").is_file()

    # Again, without nvidia-smi: the phantom set is reused and the previous run replaced, not refused.
    env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                  if not (Path(p) / "nvidia-smi").exists())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at 64 px in" in again.stdout and "; reused" in again.stdout
    assert "GPU busy: n/a (no nvidia-smi)" in again.stdout.splitlines()


def test_competition_bad_parameter_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "competition.py"), "--dry-run", "--data",
                          str(tmp_path), "-p", "epochz=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "unknown key 'epochz'" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing generated before the parameters were checked


@pytest.mark.slow
def test_notebook_defaults_reports_minutes_and_score_against_the_floor(tmp_path: Path) -> None:
    """bench/notebook_defaults.py at dry-run size: one notebook run by papermill, its line, and the exit
    status that follows from the printed score; an unknown notebook is one error line."""
    data = tmp_path / "ph"
    subprocess.run([sys.executable, "-m", "lungs_utils", "phantom", str(data), "--train", "36", "--test", "9",
                    "--size", "32"], check=True, capture_output=True)
    script = str(ROOT / "bench" / "notebook_defaults.py")
    out = subprocess.run([sys.executable, script, "--only", "15_modern", "--data", str(data / "data"),
                          "-p", "epochs=1", "-p", "image_size=32"], capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("15_modern: ")]
    assert len(line) == 1, out.stdout + out.stderr
    f1 = float(line[0].split("validation macro-F1 ")[1].split(":")[0])
    assert out.returncode == (0 if f1 >= 0.6 else 1), out.stdout
    assert ("learns" in line[0]) == (f1 >= 0.6)
    bad = subprocess.run([sys.executable, script, "--only", "99_nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: not a model notebook: 99_nope; choose from " + ", ".join(
            ("10_simple_cnn", "11_resnet", "12_unet", "13_mobilenet", "14_vgg", "15_modern"))]
