"""Leaderboard (lungs_utils.analysis.leaderboard) and HTML report (lungs_utils.analysis.report) on hand-made run folders."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from lungs_utils import LungsError
from lungs_utils.analysis import leaderboard
from lungs_utils.analysis import report
from lungs_utils.app.cli import main
from lungs_utils.paths import outputs_dir


def make_run(root: Path, name: str, f1: float | None, *, model: str = "simple_cnn", lr: float = 1e-3,
             val_ids: tuple[int, ...] = (1, 2, 3), ensemble: bool = False, notebook: bool = True,
             epochs: int = 2) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    params = {"notebook": "10_simple_cnn.ipynb", "run_name": name, "model": model, "lr": lr, "epochs": epochs,
              "seed": 0, "ensemble_method": "mean"}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    if f1 is not None:
        metrics = {"val_macro_f1": f1, "val_accuracy": f1 + 0.01}
        if ensemble:
            metrics["ensemble_method"] = "mean"
            (folder / "ensemble.json").write_text("{}")
        else:
            metrics.update(model=model, epochs_run=epochs, best_epoch=epochs, train_seconds=60.0,
                           train_images_per_s=10.0, synthetic_data=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "run.json").write_text(json.dumps({"status": "ok", "wall_seconds": 90.0, "started": "t",
                                                  "executed_notebook": str(folder / "10_simple_cnn.ipynb")}))
    if not ensemble and f1 is not None:
        pd.DataFrame({"epoch": range(1, epochs + 1), "train_seconds": [30.0] * epochs,
                      "val_seconds": [6.0] * epochs, "images_per_s": [20.0] * epochs}).to_csv(
            folder / "history.csv", index=False)
        probs = np.full((len(val_ids), 3), 1 / 3)
        pd.DataFrame({"id": val_ids, "true": 0, "predicted": 0, "p0": probs[:, 0], "p1": probs[:, 1],
                      "p2": probs[:, 2]}).to_csv(folder / "val_predictions.csv", index=False)
        pd.DataFrame({"id": [9], "p0": [0.3], "p1": [0.3], "p2": [0.4]}).to_csv(
            folder / "test_predictions.csv", index=False)
    if notebook:
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("print('hello')")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"hello from {name}\n")]
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), cell]
        nbformat.write(nb, str(folder / "10_simple_cnn.ipynb"))
    return folder


@pytest.fixture
def runs() -> Path:
    root = outputs_dir()
    make_run(root, "b_resnet", 0.8, model="resnet18", lr=2e-3)
    make_run(root, "a_cnn", 0.9)
    make_run(root, "c_ens", 0.95, ensemble=True)
    make_run(root, "d_data", None)  # e.g. the data notebook: no metrics, not on the board
    return root


def test_gather_sorts_by_f1_and_shows_varying_params(runs: Path) -> None:
    table = leaderboard.gather()
    assert table["run"].tolist() == ["c_ens", "a_cnn", "b_resnet"]
    row = table.set_index("run").loc["a_cnn"]
    assert row["model"] == "simple_cnn" and row["data"] == "phantom" and row["status"] == "ok"
    assert row["epochs"] == 2 and row["train_minutes"] == pytest.approx(72 / 60)  # from history.csv
    assert row["images_per_s"] == 20.0 and row["wall_minutes"] == 1.5
    assert table.set_index("run").loc["c_ens", "model"] == "ensemble (mean)"
    shown = leaderboard.compact(table)
    assert "lr" in shown.columns  # differs between the two model runs
    assert "seed" not in shown.columns and "epochs" in shown.columns  # same everywhere: hidden
    assert list(shown.columns).count("model") == 1


def test_write_and_cli(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = leaderboard.write()
    assert path == runs / "leaderboard.csv"
    assert pd.read_csv(path)["run"].tolist() == ["c_ens", "a_cnn", "b_resnet"]
    assert main(["leaderboard"]) == 0
    out = capsys.readouterr().out
    assert out.index("c_ens") < out.index("a_cnn") < out.index("b_resnet")
    assert "leaderboard.csv" in out


def test_broken_side_files_do_not_hide_the_board(runs: Path) -> None:
    (runs / "a_cnn" / "run.json").write_text("{not json")
    (runs / "a_cnn" / "params.yaml").write_text(": : :")
    (runs / "a_cnn" / "history.csv").write_text("")
    table = leaderboard.gather()
    assert "a_cnn" in table["run"].tolist()


def test_empty_outputs() -> None:
    assert leaderboard.gather().empty
    assert "no finished runs" in leaderboard.format_table(leaderboard.gather())


def test_ensemble_candidates_skip_ensembles_and_other_splits(runs: Path) -> None:
    import os

    make_run(runs, "e_other_split", 0.5, val_ids=(7, 8))
    newest = make_run(runs, "f_newest", 0.5)
    os.utime(newest / "val_predictions.csv", (2e9, 2e9))  # surely the newest
    found = [p.name for p in leaderboard.ensemble_candidates()]
    assert found == ["a_cnn", "b_resnet", "f_newest"]  # not the ensemble, not the run on another split
    found = [p.name for p in leaderboard.ensemble_candidates(exclude=[runs / "a_cnn"])]
    assert found == ["b_resnet", "f_newest"]
    names = [p.name for p in leaderboard.resolve_runs(["a_cnn", str(runs / "b_resnet")])]
    assert names == ["a_cnn", "b_resnet"]
    with pytest.raises(LungsError, match="not found.*finished runs: a_cnn"):
        leaderboard.resolve_runs(["nope"])


def test_resolve_runs_without_any_run() -> None:
    with pytest.raises(LungsError, match="no finished runs"):
        leaderboard.resolve_runs([])


def test_report_renders_pages_and_an_index(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = report.render()
    pages = sorted(p.name for p in index.parent.glob("*.html"))
    assert pages == ["a_cnn.html", "b_resnet.html", "c_ens.html", "d_data.html", "index.html"]
    assert "hello from a_cnn" in (index.parent / "a_cnn.html").read_text()
    text = index.read_text()
    assert 'href="a_cnn.html"' in text and "0.9" in text and "d_data" in text
    assert main(["report", str(runs / "b_resnet")]) == 0
    assert str(index) in capsys.readouterr().out


def test_report_errors() -> None:
    with pytest.raises(LungsError, match="no executed notebooks"):
        report.render()
    assert main(["report", "missing_folder"]) == 2


def test_ensemble_cli_writes_a_run_folder(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "ens"
    assert main(["ensemble", str(runs / "a_cnn"), str(runs / "b_resnet"), "--out", str(out),
                 "--method", "mean"]) == 0
    printed = capsys.readouterr().out
    assert "ensemble (mean) val macro-F1" in printed and "a_cnn" in printed
    for name in ("submission.csv", "val_predictions.csv", "test_predictions.csv", "metrics.json", "ensemble.json"):
        assert (out / name).is_file()
    assert main(["ensemble", str(runs / "a_cnn"), str(runs / "c_ens"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_ensemble_tables_for_the_notebook(runs: Path) -> None:
    import warnings

    from lungs_utils.analysis.ensemble import ensemble_runs

    result = ensemble_runs([runs / "a_cnn", runs / "b_resnet"], method="mean")
    table = report.ensemble_table(result)
    assert list(table.index) == ["a_cnn", "b_resnet", "ensemble (mean)"]
    assert table.loc["a_cnn", "weight"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no read-only-array warning from torch
        scores = report.ensemble_metrics(result)
    assert scores["confusion_matrix"][0][0] == 3 and scores["accuracy"] == 1.0


def test_report_lists_runs_made_in_jupyterlab_and_keeps_a_wide_board_in_its_own_box(runs: Path) -> None:
    # A run from JupyterLab saved its notebook where it was opened: no page, still on the leaderboard.
    make_run(runs, "e_lab", 0.7, notebook=False, lr=5e-3, model="vgg16")
    text = report.render().read_text()
    assert "e_lab" in text and 'href="e_lab.html"' not in text
    assert '<div class="board-wrap">' in text and "overflow-x: auto" in text and "position: sticky" in text


def test_report_of_jupyterlab_runs_only(tmp_path: Path) -> None:
    make_run(outputs_dir(), "lab_only", 0.7, notebook=False)
    assert "lab_only" in report.render().read_text()
