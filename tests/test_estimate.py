"""Know the cost before you wait: `--estimate`, the estimate every run prints first, Kaggle's projection.

How close the estimates come to the real minutes is shown by `bench/estimate.py` (timings are never
asserted in tests); here: the code paths, that nothing is written, that no random draw of the run moves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import small_phantom

from lungs_utils.engine import estimate
from lungs_utils import params as P
from lungs_utils.app.cli import main
from lungs_utils.paths import outputs_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_phantom(tmp_path_factory, "est", n_train=30, seed=2)


def write(folder: Path, **values: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump({"notebook": "15_modern.ipynb", "run_name": "est", "model": "resnet_tiny",
                                    "image_size": 32, "epochs": 4, "batch_size": 8, "device": "cpu", **values}))
    return path


@pytest.mark.parametrize("command", ["train", "run"])
def test_estimate_prints_the_expected_minutes_and_writes_no_run(ph: Path, tmp_path: Path, command: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    params = write(tmp_path, data_dir=str(ph), cv=3, start_size=16, tta=True)
    assert main([command, str(params), "--estimate"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("estimate: about ") and "3 fold(s) x 4 epochs x 20 train + 10 held-out films" in out
    assert "6 test films x 4 views" in out and "ms per training image at 16 px" in out and "at 32 px" in out
    assert not (outputs_dir() / "est").exists()  # writing no run


def test_a_notebook_that_trains_nothing_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(ROOT / "params" / "90_ensemble.yaml"), "--estimate"]) == 0
    assert "trains nothing" in capsys.readouterr().out


def test_the_estimate_moves_no_random_draw_of_the_run(ph: Path) -> None:
    p = P.load(overrides={"data_dir": str(ph), "model": "simple_cnn", "image_size": 32, "epochs": 2,
                          "batch_size": 8, "device": "cpu"})
    torch.manual_seed(3)
    np.random.seed(3)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(3)
    np.random.seed(3)
    e = estimate.measure(p, 30, 6, (32, 32))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert e.seconds > 0 and set(e.parts) == {"training", "validation", "prediction", "audit", "start-up"}
    assert e.plan.startswith("2 epochs x 24 train + 6 held-out films")


def test_every_run_says_its_estimate_first_and_a_resume_counts_what_is_done(ph: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    params = write(tmp_path, data_dir=str(ph), epochs=2, audit=False, tta=False)
    assert main(["train", str(params)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0].startswith("estimate: about ")
    resumed = P.load(params, {"resume": True})
    assert "2 epoch(s) already done" in estimate.for_params(resumed).plan


def test_lungs_run_measures_once_and_the_notebook_shows_the_same_line(ph: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from lungs_utils.runs import runner

    calls = []
    said = estimate.Estimate(7.0, {"training": 5.0, "start-up": 2.0}, "here", "1 epoch")
    monkeypatch.setattr(runner, "estimate", lambda values, progress=False: calls.append(values) or said)
    seen = {}

    def fake_papermill(*args, **kwargs):  # the kernel would see this environment
        import os

        seen["env"] = os.environ.get(estimate.ESTIMATE_ENV)
        raise RuntimeError("stop here")

    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_papermill)
    record = runner.execute(write(Path(str(ph)).parent / "cfg", data_dir=str(ph)))
    assert len(calls) == 1 and estimate.Estimate.from_json(seen["env"]) == said and record.status == "failed"
    assert capsys.readouterr().out.startswith(f"est: {said.line()}")
    monkeypatch.setenv(estimate.ESTIMATE_ENV, said.to_json())
    assert estimate.announce({}, None) == said  # no measuring in the notebook again
    assert capsys.readouterr().out == said.line() + "\n"


def test_kaggle_projection_per_fold_and_the_session_limit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = P.load(ROOT / "params" / "11_resnet18.yaml")
    one = estimate.kaggle(base)
    two = estimate.kaggle(base, gpus=2)
    assert 0 < two["seconds"] < one["seconds"] and not one["over_limit"] and one["warning"] == ""
    assert "not measured" not in one["line"] and "no T4 has confirmed" in one["line"]
    cv = estimate.kaggle({**base, "cv": 5})
    assert cv["parts"] == 5 and "per fold" in cv["line"] and cv["seconds"] > 4 * one["seconds"]
    heavy = estimate.kaggle({**base, "model": "vgg19", "epochs": 300, "cv": 5})
    assert heavy["over_limit"] and "12-hour session limit" in heavy["warning"]
    assert main(["kaggle-kernel", str(ROOT / "params" / "11_resnet18.yaml"), "--out", str(tmp_path / "k"),
                 "--user", "someone", "-p", "cv=5", "-p", "epochs=300", "-p", "model=vgg19"]) == 0
    captured = capsys.readouterr()
    assert "expected on Kaggle (1 x T4)" in captured.out and "session limit" in captured.err
    assert json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())["enable_gpu"]
