"""The papermill runner (lungs_utils.runs.runner) and its CLI: run folders, existing folders (error / suffix /
resume), the lock, failures, pipelines and parameter validation.

A stub notebook (no torch in its kernel) keeps these fast; the real notebooks run in test_notebooks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from lungs_utils import LungsError
from lungs_utils import paths
from lungs_utils.runs import pipeline, runner
from lungs_utils.app.cli import main
from lungs_utils.paths import outputs_dir

STUB_SOURCE = """
import json, time
from lungs_utils.paths import outputs_dir
if seed == 13:
    raise ValueError("boom on purpose")
if seed == 7:
    time.sleep(3)
if seed == 8:  # long enough to be interrupted mid-cell
    time.sleep(60)
(outputs_dir() / run_name / "metrics.json").write_text(json.dumps({"val_macro_f1": 0.5, "resume": resume}))
if seed in (21, 22):  # a submission for three test images: all right (21) or all "normal" (22)
    labels = [0, 1, 2] if seed == 21 else [0, 0, 0]
    rows = "".join(f"{i},{y}\\n" for i, y in zip((1, 2, 3), labels))
    (outputs_dir() / run_name / "submission.csv").write_text("id,target_feature\\n" + rows)
"""


@pytest.fixture
def stub(isolated_env: Path) -> Path:
    """``notebooks/stub.ipynb`` in the isolated project root and a params file that runs it."""
    nb = nbformat.v4.new_notebook()
    params_cell = nbformat.v4.new_code_cell('run_name = "stub"\nseed = 0')
    params_cell.metadata["tags"] = ["parameters"]
    nb.cells = [params_cell, nbformat.v4.new_code_cell(STUB_SOURCE.strip())]
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, str(isolated_env / "notebooks" / "stub.ipynb"))
    return write_params(isolated_env / "params" / "stub.yaml")


def write_params(path: Path, **values: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"notebook": "stub.ipynb", "run_name": "stub", **values}))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------------------ fast
def test_param_errors_through_the_cli_are_one_line_exit_2(stub: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["run", str(stub), "-p", "epochz=3"]) == 2
    err = one_line_error(capsys)
    assert "unknown key 'epochz'" in err and "did you mean 'epochs'" in err
    assert main(["run", str(stub), "-p", "epochs=many"]) == 2
    assert "'epochs' must be integer" in one_line_error(capsys)
    assert main(["run", str(stub), "-p", "epochs"]) == 2
    assert "expected key=value" in one_line_error(capsys)
    assert main(["pipeline", str(stub), "-p", "=3"]) == 2  # checked before any run starts
    assert "expected key=value" in one_line_error(capsys)
    bad = write_params(stub.parent / "bad.yaml", learning_rate=0.1)
    assert main(["run", str(bad)]) == 2
    assert "unknown key 'learning_rate'" in one_line_error(capsys)
    wrong = write_params(stub.parent / "wrong.yaml", image_size="big")
    assert main(["run", str(wrong)]) == 2
    assert "'image_size' must be integer" in one_line_error(capsys)
    assert not (outputs_dir() / "stub").exists()  # nothing was started


def test_missing_notebook_model_or_file(stub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write_params(stub.parent / "nb.yaml", notebook="nope.ipynb"))]) == 2
    assert "'nope.ipynb' not found" in one_line_error(capsys)
    assert main(["run", str(stub), "-p", "model=resnet9000"]) == 2
    assert "unknown model 'resnet9000'" in one_line_error(capsys)
    assert main(["run", "no/such/file.yaml"]) == 2
    assert "params file not found" in one_line_error(capsys)
    assert main(["pipeline", "no/such/dir"]) == 2
    assert "not found" in one_line_error(capsys)


def test_cli_error_in_a_subprocess(stub: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lungs_utils", "run", str(stub), "-p", "nope=1"],
                         capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown key 'nope'" in out.stderr


def test_expand_sorts_folders_and_keeps_file_order(tmp_path: Path) -> None:
    for name in ("b.yaml", "a.yaml", "c.txt"):
        (tmp_path / name).write_text("run_name: x\n")
    assert runner.expand([tmp_path / "b.yaml", tmp_path]) == [tmp_path / "b.yaml", tmp_path / "a.yaml",
                                                                   tmp_path / "b.yaml"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LungsError, match="no \\*.yaml"):
        runner.expand([tmp_path / "empty"])


def test_expand_finds_a_suite_params_file_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A notebook's kernel runs in notebooks/: a name under params/ still means that file.
    monkeypatch.chdir(tmp_path)
    tiny, small = paths.suite_path("params", "demo", "15_resnet_tiny.yaml"), paths.suite_path("params", "cpu_small.yaml")
    assert runner.expand(["demo/15_resnet_tiny.yaml", "params/cpu_small.yaml", "cpu_small.yaml"]) == [tiny, small, small]
    with pytest.raises(LungsError, match="not found: demo/nope.yaml"):
        runner.expand(["demo/nope.yaml"])


def test_live_lock_refuses_and_stale_lock_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(LungsError, match=f"already running \\(pid {os.getpid()}"):
        paths.acquire_lock(folder, "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid}))
    lock = paths.acquire_lock(folder, "run")
    assert json.loads(lock.read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------------ papermill
@pytest.mark.slow
def test_run_writes_executed_notebook_params_and_run_json(stub: Path) -> None:
    record = runner.run(stub, ["seed=1"])
    folder = outputs_dir() / "stub"
    assert record.ok and record.run_dir == folder and record.val_macro_f1 == 0.5
    assert record.notebook == folder / "stub.ipynb"
    executed = nbformat.read(str(record.notebook), as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["seed"] == 1 and params["run_name"] == "stub" and "label_smoothing" in params
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and info["error"] is None and info["wall_seconds"] > 0
    assert info["overrides"] == ["seed=1"] and info["params_file"] == str(stub)
    assert set(info["versions"]) == {"torch", "torchvision", "numpy", "pandas", "papermill", "lungs"}
    for key in ("git_commit", "python", "platform", "device", "cpu", "started", "finished"):
        assert key in info
    assert info["device"].startswith(("cpu", "cuda"))
    assert not (folder / ".lock").exists()


@pytest.mark.slow
def test_existing_folder_error_suffix_and_resume(stub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner.run(stub)
    with pytest.raises(LungsError) as info:
        runner.run(stub)
    message = str(info.value)
    assert "already holds a run (metrics.json)" in message and "-p resume=true" in message
    assert "--suffix" in message and "-p overwrite=true" in message
    assert main(["run", str(stub)]) == 2
    one_line_error(capsys)
    assert runner.run(stub, on_exists="suffix").name == "stub-2"
    assert main(["run", str(stub), "--suffix"]) == 0
    assert "stub-3" in capsys.readouterr().out
    record = runner.run(stub, on_exists="resume")
    assert record.name == "stub" and record.ok
    assert yaml.safe_load((outputs_dir() / "stub" / "params.yaml").read_text())["resume"] is True
    assert json.loads((outputs_dir() / "stub" / "run.json").read_text())["resumed"] is True
    assert json.loads((outputs_dir() / "stub" / "metrics.json").read_text())["resume"] is True  # kernel saw it
    assert runner.run(stub, ["resume=true"]).name == "stub"  # -p resume=true means the same
    # overwrite: the old run goes, a new one takes its place (same folder, no suffix)
    (outputs_dir() / "stub" / "old-product.txt").write_text("from the replaced run")
    assert runner.run(stub, ["overwrite=true"]).name == "stub"
    assert not (outputs_dir() / "stub" / "old-product.txt").exists()
    assert json.loads((outputs_dir() / "stub" / "metrics.json").read_text())["resume"] is False
    assert main(["run", str(stub), "--overwrite"]) == 0


@pytest.mark.slow
def test_notebook_failure_is_one_line_naming_the_notebook(stub: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    with pytest.raises(LungsError) as info:
        runner.run(stub, ["seed=13"])
    message = str(info.value)
    executed = outputs_dir() / "stub" / "stub.ipynb"
    assert "ValueError: boom on purpose" in message and str(executed) in message and "cell [" in message
    assert "\n" not in message
    run_info = json.loads((outputs_dir() / "stub" / "run.json").read_text())
    assert run_info["status"] == "failed" and "boom on purpose" in run_info["error"]
    assert not (outputs_dir() / "stub" / ".lock").exists()
    assert main(["run", str(stub), "-p", "seed=13", "--resume"]) == 2
    assert "boom on purpose" in one_line_error(capsys)
    # A run that produced nothing leaves only traces: the same command (fixed) simply reuses the folder.
    assert sorted(p.name for p in (outputs_dir() / "stub").iterdir()) == ["kernel.log", "params.yaml", "run.json",
                                                                       "stub.ipynb"]
    record = runner.run(stub)
    assert record.ok and record.name == "stub"


@pytest.mark.slow
def test_concurrent_run_with_the_same_name_is_refused(stub: Path, capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    first = subprocess.Popen([sys.executable, "-m", "lungs_utils", "run", str(stub), "-p", "seed=7"],
                             env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = outputs_dir() / "stub" / ".lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert lock.exists(), first.communicate()
    assert main(["run", str(stub), "--resume"]) == 2
    assert "already running" in one_line_error(capsys)
    assert main(["run", str(stub), "--suffix"]) == 2  # a live run is never "existing"
    assert "already running" in one_line_error(capsys)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not lock.exists()


@pytest.mark.slow
def test_pipeline_reports_a_failure_and_runs_the_rest(stub: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "batch"
    write_params(folder / "1_a.yaml", run_name="a")
    write_params(folder / "2_b.yaml", run_name="b", seed=13)
    write_params(folder / "3_c.yaml", run_name="c", bogus=1)
    write_params(folder / "4_d.yaml", run_name="d")
    records = pipeline.pipeline([folder], ["epochs=1"], echo=False)
    assert [(r.name, r.status) for r in records] == [("a", "ok"), ("b", "failed"), ("3_c", "failed"),
                                                     ("d", "ok")]
    assert str(outputs_dir() / "b" / "stub.ipynb") in records[1].error
    assert "unknown key 'bogus'" in records[2].error and records[2].notebook is None
    table = pipeline.summary_table(records)
    assert table["status"].tolist() == ["ok", "failed", "failed", "ok"]
    assert yaml.safe_load((outputs_dir() / "d" / "params.yaml").read_text())["epochs"] == 1
    assert main(["pipeline", str(folder / "1_a.yaml"), str(folder / "2_b.yaml"), "--resume"]) == 1
    captured = capsys.readouterr()
    assert "1 of 2 runs failed: b" in captured.err and "boom on purpose" in captured.err
    assert "ok" in captured.out and "failed" in captured.out


def test_demo_fresh_removes_only_the_demo_runs() -> None:
    from lungs_utils.app import demo

    files = demo.demo_params()
    assert [p.stem for p in files][0] == "00_data" and len(files) >= 4
    for name in ("demo_resnet_tiny", "mine"):
        (outputs_dir() / name).mkdir(parents=True)
    demo._remove_demo_runs(files)
    assert not (outputs_dir() / "demo_resnet_tiny").exists() and (outputs_dir() / "mine").is_dir()


@pytest.mark.slow
def test_pipeline_scores_every_submission_against_an_answer_key(stub: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "modes"
    write_params(folder / "1_right.yaml", run_name="right", seed=21)
    write_params(folder / "2_naive.yaml", run_name="naive", seed=22)
    write_params(folder / "3_none.yaml", run_name="none")  # no submission: nothing to score
    answers = tmp_path / "test_answers.csv"
    answers.write_text("id,target_feature\n1,0\n2,1\n3,2\n")
    assert main(["pipeline", str(folder), "--answers", str(answers)]) == 0
    out = capsys.readouterr().out
    assert "test_macro_f1" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["right"][3] == "1.0000" and rows["naive"][3] == f"{0.5 / 3:.4f}" and rows["none"][3] == "-"
    # Each with its interval over the 3 test images (a resample missing a class scores that class 0, as
    # the competition's metric does), and its gap to the first scored run, paired.
    assert "test_95ci" in out and "vs_right" in out and rows["right"][4] == "0.333-1.000"
    assert " ".join(rows["naive"][5:8]) == f"within noise: {0.5 / 3 - 1:+.3f}" and rows["right"][5] == "-"
    # A broken answer key is refused before anything runs.
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n1,0\n")
    assert main(["pipeline", str(folder), "--answers", str(bad), "--suffix"]) == 2
    assert "target_feature" in one_line_error(capsys)
    assert not (outputs_dir() / "right-2").exists()


@pytest.mark.slow
def test_ctrl_c_during_a_run_prints_one_line(stub: Path) -> None:
    """Ctrl-C reaches the whole foreground process group; the kernel's own tracebacks go to kernel.log."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "lungs_utils", "run", str(stub), "-p", "seed=8"],
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    folder = outputs_dir() / "stub"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (folder / "stub.ipynb").exists():
        time.sleep(0.2)
    time.sleep(4)  # the kernel is now inside the sleeping cell
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.startswith("interrupted after ") and err.count("\n") == 1, err
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    assert (folder / "kernel.log").is_file() and not (folder / ".lock").exists()
