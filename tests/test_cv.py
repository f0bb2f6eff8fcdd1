"""Cross-validation as one run: every fold a sub-run, out-of-fold predictions of every train image, one
temperature, fold-averaged test probabilities; resume inside a fold; audit, leaderboard and ensembles on
the out-of-fold predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import small_phantom

from lungs_utils.stats import calibration
from lungs_utils.analysis import ensemble
from lungs_utils.runs import experiment
from lungs_utils.analysis import leaderboard
from lungs_utils import params as P
from lungs_utils.app.cli import main
from lungs_utils.errors import LungsError
from lungs_utils.stats.metrics import macro_f1
from lungs_utils.xrays.submission import OOF_COLUMNS, PROB_COLUMNS, VAL_COLUMNS

TIMING = ["train_seconds", "val_seconds", "images_per_s"]


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_phantom(tmp_path_factory, "cv", n_train=36, seed=4)


def quick(data: Path, **extra: object) -> dict:
    return P.load(overrides={"data_dir": str(data), "run_name": "cv", "model": "resnet_tiny", "epochs": 2,
                             "image_size": 32, "batch_size": 8, "device": "cpu", "cv": 3, "tta": False,
                             "audit": False, **extra})


def test_a_cv_run_trains_every_fold_and_scores_every_train_image_out_of_fold(cv_data: Path) -> None:
    exp = experiment.run(quick(cv_data), progress=False)
    run = exp.run_dir
    split = pd.read_csv(run / "split.csv")
    assert list(split.columns) == ["id", "target_feature", "fold"] and sorted(split["fold"].unique()) == [0, 1, 2]
    for k in range(3):  # each fold a complete sub-run
        for name in ("history.csv", "checkpoints/best.pt", "checkpoints/last.pt", "metrics.json",
                     "val_predictions.csv", "test_predictions.csv"):
            assert (run / f"fold_{k}" / name).is_file(), (k, name)
        assert any((run / f"fold_{k}" / "tb").iterdir())

    oof = pd.read_csv(run / "oof_predictions.csv")
    assert tuple(oof.columns) == OOF_COLUMNS and len(oof) == 36
    assert sorted(oof["id"]) == sorted(split["id"])  # every train image exactly once
    assert (oof.set_index("id")["fold"] == split.set_index("id")["fold"].loc[oof["id"]]).all()
    val = pd.read_csv(run / "val_predictions.csv")
    assert tuple(val.columns) == VAL_COLUMNS
    pd.testing.assert_frame_equal(val, oof[list(VAL_COLUMNS)])

    m = json.loads((run / "metrics.json").read_text())
    assert m["n_val"] == 36 and m["val_set"].startswith("out-of-fold")
    assert m["val_macro_f1"] == pytest.approx(macro_f1(oof["true"], oof["predicted"]))
    low, high = m["val_macro_f1_ci"]
    assert low <= m["val_macro_f1"] <= high
    cv = m["cv"]
    assert cv["k"] == 3 and [f["fold"] for f in cv["folds"]] == [0, 1, 2]
    for f in cv["folds"]:  # each fold's figure is its own held-out rows of the out-of-fold table
        rows = oof[oof["fold"] == f["fold"]]
        assert f["n_val"] == len(rows) and f["val_macro_f1"] == pytest.approx(macro_f1(rows["true"], rows["predicted"]))
        assert f["epochs_run"] == 2 and f["best_epoch"] in (1, 2)
    assert cv["fold_mean"] == pytest.approx(np.mean([f["val_macro_f1"] for f in cv["folds"]]))
    history = pd.read_csv(run / "history.csv")
    assert sorted(history["fold"].unique()) == [0, 1, 2] and len(history) == 6

    # One temperature, fitted on the raw out-of-fold probabilities; test = the folds' calibrated mean.
    raw = exp.outputs["val_probs_raw"]
    t = calibration.fit_temperature(raw, exp.outputs["val_true"])
    assert m["calibration"]["temperature"] == pytest.approx(t, rel=1e-6)
    np.testing.assert_allclose(oof[list(PROB_COLUMNS)], calibration.apply_temperature(raw, t), atol=1e-6)
    folds = [pd.read_csv(run / f"fold_{k}" / "test_predictions.csv")[list(PROB_COLUMNS)].to_numpy() for k in range(3)]
    test = pd.read_csv(run / "test_predictions.csv")
    np.testing.assert_allclose(test[list(PROB_COLUMNS)], np.mean(folds, axis=0), atol=1e-6)
    sub = pd.read_csv(run / "submission.csv")
    assert (sub["target_feature"].to_numpy() == test[list(PROB_COLUMNS)].to_numpy().argmax(axis=1)).all()


@pytest.mark.slow
def test_a_cv_run_killed_inside_a_fold_resumes_in_that_fold_to_the_same_result(cv_data: Path, tmp_path: Path
                                                                                ) -> None:
    straight = experiment.run(quick(cv_data, output_dir=str(tmp_path / "straight"), epochs=3), progress=False)
    p = quick(cv_data, output_dir=str(tmp_path / "resumed"), epochs=3)
    first = experiment.prepare(p, progress=False)
    experiment.train(first, progress=False, stop_after=4)  # fold 0 done, fold 1 after its first epoch
    resumed_dir = tmp_path / "resumed"
    assert len(pd.read_csv(resumed_dir / "fold_1" / "history.csv")) == 1
    assert not (resumed_dir / "fold_2").exists() and not (resumed_dir / "metrics.json").exists()
    with pytest.raises(LungsError, match="fold 1 of run cv is not trained yet.*resume"):
        experiment.predict_and_save(first, progress=False)
    again = experiment.prepare({**p, "resume": True}, progress=False)
    experiment.train(again, progress=False)
    experiment.predict_and_save(again, progress=False)
    for k in range(3):
        a = pd.read_csv(straight.run_dir / f"fold_{k}" / "history.csv").drop(columns=TIMING)
        b = pd.read_csv(resumed_dir / f"fold_{k}" / "history.csv").drop(columns=TIMING)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    for name in ("oof_predictions.csv", "test_predictions.csv", "submission.csv"):
        assert (resumed_dir / name).read_bytes() == (straight.run_dir / name).read_bytes(), name


def test_the_old_fold_keys_say_what_to_write_instead(cv_data: Path) -> None:
    with pytest.raises(LungsError, match=r"-p folds: 'folds' is now 'cv' .*write cv: 3"):
        P.parse_overrides(["folds=3"])
    with pytest.raises(LungsError, match=r"'fold' is gone: cv: k trains every fold in one run; .*cv: null"):
        P.load(overrides={"fold": 1})
    with pytest.raises(LungsError, match=r"parameters cell: 'folds' is now 'cv'.*write cv: 2"):
        P.from_namespace({"folds": 2, "run_name": "x"})
    # A run folder written before the rename still opens: a segmentation run's folds are its cv.
    old = cv_data.parent / "old_run"
    old.mkdir()
    (old / "params.yaml").write_text("notebook: 05_lung_segmentation.ipynb\nfolds: 3\nfold: 0\nmodel: unet_small\n")
    assert P.load_run(old / "params.yaml")["cv"] == 3


@pytest.mark.slow
def test_audit_leaderboard_and_ensemble_use_the_out_of_fold_predictions(cv_data: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    a = experiment.run(quick(cv_data, run_name="cv_a", audit=True), progress=False)
    experiment.run(quick(cv_data, run_name="cv_b", seed=1, model="simple_cnn"), progress=False)
    single = experiment.run(quick(cv_data, run_name="single", cv=None), progress=False)

    audit = json.loads((a.run_dir / "metrics.json").read_text())["audit"]
    assert audit["status"] == "ok" and audit["n"] == 36  # every train image, by the fold that held it out
    table = pd.read_csv(a.run_dir / "audit.csv")
    assert len(table) == 36 and sorted(table["fold"].unique()) == [0, 1, 2]
    assert main(["audit", "cv_a"]) == 0  # rebuilt from every fold's checkpoint
    assert "audited on 36 held-out images" in capsys.readouterr().out

    board = leaderboard.gather().set_index("run")
    # Two CV runs share their images whatever their seed: compared paired. The single split is alone.
    assert sorted(board.loc[["cv_a", "cv_b"], "vs_best"]) in (["best", "within noise"], ["behind", "best"])
    assert board.loc["single", "vs_best"] == "" and board.loc["cv_a", "val_images"] == 36
    assert (board["val_f1_low"] <= board["val_macro_f1"]).all() and (board["val_macro_f1"] <= board["val_f1_high"]).all()
    assert board.loc["cv_a", "val_set"] == "out-of-fold" and board.loc["single", "val_set"] == "validation"

    result = ensemble.ensemble_runs([a.run_dir, a.run_dir.parent / "cv_b"], method="weighted")
    assert result.oof and len(result.val_frame) == 36 and "36 out-of-fold predictions" in result.fitted_on
    with pytest.raises(LungsError, match="cross-validation run .* single split"):
        ensemble.ensemble_runs([a.run_dir, single.run_dir], method="mean")
