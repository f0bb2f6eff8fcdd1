"""lungs sweep: the search space is checked, trials are runs reported to an Optuna study, a pruned trial is
recorded as pruned, a killed sweep resumes (its trial from its last checkpoint), the best recipe runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import yaml
from conftest import write_dataset

from lungs_utils.errors import LungsError
from lungs_utils.runs import sweep
from lungs_utils.runs.trial import Report

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the space
def test_the_shipped_spaces_hold_the_recipes_they_tune() -> None:
    space = sweep.load_space("sweep/cpu_space.yaml")
    recipe = yaml.safe_load((ROOT / "params" / "cpu_small.yaml").read_text())
    from lungs_utils import params

    values = params.load(ROOT / "params" / "cpu_small.yaml")
    assert all(dim.holds(values[key]) for key, dim in space.items()), \
        [k for k, d in space.items() if not d.holds(values[k])]  # so the recipe itself is trial 0
    assert recipe["run_name"] == "cpu_small"
    cv = params.load(ROOT / "params" / "cpu_cv.yaml")
    assert all(dim.holds(cv[key]) for key, dim in sweep.load_space("sweep/cpu_cv_space.yaml").items())
    assert set(sweep.load_space("sweep/demo_space.yaml")) == {"lr", "label_smoothing", "epochs"}


@pytest.mark.parametrize(("raw", "says"), [
    ({"lrr": {"low": 0.1, "high": 1.0}}, "unknown key 'lrr' (did you mean 'lr'?)"),
    ({"seed": {"choices": [0, 1]}}, "a sweep does not search 'seed'"),
    ({"lr": {"low": -1.0, "high": 1.0}}, "lr.low"),
    ({"rotate": {"low": 10.0, "high": 5.0}}, "low (10.0) must be below high (5.0)"),
    ({"model": {"choices": ["resnet_tiny", "resnet_huge"]}}, "resnet_huge"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
    ({"lr": {"min": 0.0, "max": 0.1}}, "write {low: .., high: ..}"),
    ({"lr": {"low": 0.001, "high": 0.1, "stepp": 2}}, "unknown field(s) stepp"),
    ({"optimizer": {"choices": ["adamw", "lion"]}}, "optimizer"),
    ({"model": {"low": 1, "high": 2}}, "'model' must be text"),
    ([1, 2], "a search space is a mapping"),
])
def test_a_bad_space_is_one_line_naming_the_entry(raw: object, says: str) -> None:
    with pytest.raises(LungsError) as err:
        sweep.check_space(raw, "space.yaml")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_start_size_at_or_above_the_image_size_is_no_progressive_resizing() -> None:
    import optuna

    space = sweep.check_space({"image_size": {"choices": [64, 96]}, "start_size": {"choices": [None, 96]}}, "s")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"image_size": 64, "start_size": 96})
    study.enqueue_trial({"image_size": 96, "start_size": None})
    assert sweep.sample(study.ask(), space) == {"image_size": 64, "start_size": None}
    assert sweep.sample(study.ask(), space) == {"image_size": 96, "start_size": None}
    assert sweep.check_space({"epochs": {"low": 40, "high": 100, "step": 10}}, "s")["epochs"].holds(80)
    assert not sweep.check_space({"epochs": {"low": 40, "high": 100, "step": 20}}, "s")["epochs"].holds(90)


def test_reports_are_made_at_the_runs_progress_in_steps_of_five_percent() -> None:
    class State:
        params: ClassVar[dict[str, int]] = {"epochs": 8}
        epoch = 3

    # Fold 1 of 3, epoch 3 of 8: (1 + 3/8) / 3 = 45.8 % -> 45.
    assert Report(None, 1, 3).step(State()) == 45
    State.epoch = 8
    assert Report(None, 2, 3).step(State()) == 100


class _Always:
    """A trial whose pruner always says stop."""

    number = 7

    def __init__(self) -> None:
        self.reported: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def should_prune(self) -> bool:
        return True


def test_a_trial_is_pruned_before_its_last_epoch_never_at_it() -> None:
    import optuna

    class State:
        params: ClassVar[dict[str, int]] = {"epochs": 8}
        epoch, validated, rank = 8, True, 0
        val_metrics: ClassVar[dict[str, float]] = {"macro_f1": 0.5}
        task = type("Task", (), {"score": "macro_f1"})

    trial = _Always()
    Report(trial, 2, 3).on_epoch_end(State())  # fold 2 of 3, its last epoch: 100 %, reported, not stopped
    assert trial.reported == [(0.5, 100)]
    State.epoch = 7
    with pytest.raises(optuna.TrialPruned, match="pruned at 95 % of its run"):
        Report(trial, 2, 3).on_epoch_end(State())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Films whose class is a bright band at one of three heights: a recipe that trains learns them in an
    epoch or two, one that cannot (lr 0) stays near chance, so the pruner's choice is not left to luck."""
    import numpy as np
    from PIL import Image

    root = write_dataset(tmp_path_factory.mktemp("sweep_films"), n_train=90, n_test=6, size=32, masks=False)
    labels = pd.read_csv(root / "train_answers.csv").set_index("id")["target_feature"]
    for i, label in labels.items():
        path = root / "train_images" / f"img_{i}.png"
        img = np.asarray(Image.open(path)) // 3
        img[label * 10:(label + 1) * 10] += 150
        Image.fromarray(img, "L").save(path)
    return root


def _board(baseline_verdict: str, gap: tuple[float, float, float] = (float("nan"),) * 3) -> pd.DataFrame:
    return pd.DataFrame({"trial": [3, 0, 1], "state": ["complete", "complete", "pruned"],
                         "baseline": [False, True, False], "vs_best": ["best", baseline_verdict, ""],
                         "gap_to_best": [0.0, gap[0], float("nan")], "gap_low": [0.0, gap[1], float("nan")],
                         "gap_high": [0.0, gap[2], float("nan")]})


def test_the_study_says_whether_it_beat_the_recipe_it_started_from() -> None:
    # Within noise: the searched "best" has not shown it pays (on qu-dev such a best lost 0.039 on test).
    said = sweep.baseline_line(_board("within noise", (-0.001, -0.02, 0.018)), 3, "cpu_cv.yaml")
    assert said is not None and said.startswith("The base recipe as given (cpu_cv.yaml, trial 0) is within noise")
    assert "keep cpu_cv.yaml" in said
    said = sweep.baseline_line(_board("behind", (-0.04, -0.07, -0.016)), 3, "cpu_cv.yaml")
    assert said is not None and "behind the best by 0.040 macro-F1 (95 % CI 0.016 to 0.070, paired)" in said
    said = sweep.baseline_line(_board("best"), 0, "cpu_cv.yaml")
    assert said == "The base recipe as given (cpu_cv.yaml, trial 0) is the best trial: keep it."
    # A baseline that was pruned (or never enqueued, its values outside the space) gets no verdict.
    pruned = _board("within noise").assign(state=["complete", "pruned", "pruned"])
    assert sweep.baseline_line(pruned, 3, "cpu_cv.yaml") is None
    assert sweep.baseline_line(_board("best").assign(baseline=False), 3, "cpu_cv.yaml") is None


def _recipe(tmp_path: Path, data: Path, **extra: object) -> Path:
    values = {"notebook": "15_modern.ipynb", "run_name": "tiny", "model": "resnet_tiny", "image_size": 32,
              "epochs": 4, "batch_size": 16, "lr": 0.004, "label_smoothing": 0.1, "device": "cpu", "rotate": 0.0, "scale": 0.0, "translate": 0.0,
              "hflip": 0.0, "audit": False,
              "tensorboard": False, "tta": False, "data_dir": str(data), **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_a_sweep_in_its_notebook_ranks_its_trials_prunes_a_hopeless_one_and_its_best_recipe_runs(
        films: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungs_utils import paths
    from lungs_utils.runs import runner

    monkeypatch.setenv("LUNGS_PROGRESS", "off")
    # Prune from the second trial on, at any step: a trial that cannot learn (lr 0) is stopped at once.
    monkeypatch.setitem(sweep.PRUNERS, "median", {"kind": "median", "startup": 1, "warmup": 0})
    recipe = _recipe(tmp_path, films)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.0, high: 0.01}\nlabel_smoothing: {low: 0.0, high: 0.2}\n")
    values = sweep.sweep_values(recipe, trials=2, space=str(space), name="sw")
    # Trial 0 is the recipe itself (its values lie in the space); then one that cannot learn.
    folder = paths.outputs_dir() / "sw"
    study, _ = sweep.open_study(folder, sweep.settings_for(values))
    study.enqueue_trial({"lr": 0.004, "label_smoothing": 0.1}, user_attrs={"baseline": True})
    study.enqueue_trial({"lr": 0.0, "label_smoothing": 0.1})
    record = runner.run(None, {**values, "resume": True})  # the notebook, as lungs run params/97_sweep.yaml
    assert record.ok, record.error
    study = sweep.load(folder)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    complete, pruned = study.trials
    # Every trial is a normal run folder; the pruned one says so in run.json, and says where it stopped.
    first = json.loads((folder.parent / "sw-t000" / "run.json").read_text())
    stopped = json.loads((folder.parent / "sw-t001" / "run.json").read_text())
    assert first["status"] == "ok" and stopped["status"] == "pruned" and "pruned at" in stopped["error"]
    assert complete.value == json.loads((folder.parent / "sw-t000" / "metrics.json").read_text())["val_macro_f1"]
    assert complete.intermediate_values and max(pruned.intermediate_values) < 100
    # The ranking: the completed trial first with its interval; the best recipe is that trial's.
    table = pd.read_csv(folder / sweep.TRIALS_FILE)
    assert table["trial"].tolist() == [0, 1] and table["state"].tolist() == ["complete", "pruned"]
    assert table.loc[0, "val_f1_low"] <= complete.value <= table.loc[0, "val_f1_high"]
    best = yaml.safe_load((folder / sweep.BEST_FILE).read_text())
    assert best["lr"] == 0.004 and best["run_name"] == "tiny-best" and "data_dir" not in best
    header = (folder / sweep.BEST_FILE).read_text().split("\n")
    assert header[2] == "# The base recipe as given (tiny.yaml, trial 0) is the best trial: keep it."
    assert "estimate: about" in header[3]
    for name in ("sweep_history", "sweep_curves", "sweep_importances", "sweep_slices"):
        assert (folder / "plots" / f"{name}.png").stat().st_size > 1000
    # best.yaml is a recipe lungs run takes as it is (given the films, which a recipe discovers).
    again = runner.run(folder / sweep.BEST_FILE, [f"data_dir={films}", "epochs=1"])
    assert again.ok and again.val_macro_f1 is not None


def _lungs(*args: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lungs_utils", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_a_killed_sweep_goes_on_where_it_stopped_and_its_trial_resumes_from_its_checkpoint(
        films: Path, tmp_path: Path) -> None:
    from lungs_utils import paths

    recipe = _recipe(tmp_path, films, epochs=30)
    space = tmp_path / "space.yaml"
    space.write_text("label_smoothing: {low: 0.0, high: 0.2}\n")
    cmd = ["sweep", str(recipe), "--trials", "1", "--space", str(space), "--name", "killed", "--pruner", "none"]
    env = {**os.environ, "LUNGS_PROGRESS": "off"}
    first = _lungs(*cmd, env=env)
    history = paths.outputs_dir() / "killed-t000" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and \
            not (history.is_file() and len(pd.read_csv(history)) >= 3):
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = _lungs(*cmd, env=env)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert "1 interrupted trial(s) to resume" in out
    assert json.loads((paths.outputs_dir() / "killed-t000" / "run.json").read_text())["resumed"]
    study = sweep.load(paths.outputs_dir() / "killed")
    killed, resumed = study.trials
    assert killed.state.name == "FAIL" and resumed.state.name == "COMPLETE"
    assert resumed.params == killed.params and resumed.user_attrs["run"] == "killed-t000"
    assert len(pd.read_csv(history)) == 30  # one run folder, trained to the end across the kill
