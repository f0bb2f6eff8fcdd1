"""Pseudo-labels: which test films a finished run labels, how they join each part's training films, what the
run records, and the one-line refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import small_phantom

from lungs_utils import params as P
from lungs_utils.analysis import leaderboard
from lungs_utils.errors import DataWarning, LungsError
from lungs_utils.runs import experiment
from lungs_utils.xrays import pseudo
from lungs_utils.xrays.data import JoinedDataset, XrayDataset
from lungs_utils.xrays.submission import PROB_COLUMNS, read_run_table

TEST_IDS = np.array([7, 3, 11, 5])  # the test set's order (not sorted: rows are positions in it)


def source_run(folder: Path, probs: dict[int, list[float]], calibrated: bool = True) -> Path:
    folder.mkdir(parents=True)
    frame = pd.DataFrame([[i, *p] for i, p in sorted(probs.items())], columns=["id", *PROB_COLUMNS])
    frame.to_csv(folder / "test_predictions.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({"n_test": len(probs),
                                                     "calibration": {"temperature": 1.3, "applied": calibrated}}))
    return folder


PROBS = {3: [0.05, 0.05, 0.90], 5: [0.60, 0.30, 0.10], 7: [0.10, 0.85, 0.05], 11: [0.95, 0.03, 0.02]}


def test_the_confident_films_are_chosen_in_the_test_sets_order(tmp_path: Path) -> None:
    run = source_run(tmp_path / "outputs" / "src", PROBS)
    found = pseudo.select(run, TEST_IDS, 0.85)
    # rows of TEST_IDS = [7, 3, 11, 5]: 7 (p 0.85, class 1), 3 (0.90, class 2), 11 (0.95, class 0); 5 is unsure
    assert found.rows.tolist() == [0, 1, 2] and found.labels.tolist() == [1, 2, 0]
    assert np.allclose(found.confidence, [0.85, 0.90, 0.95])
    assert found.summary() == {"run": "src", "threshold": 0.85, "calibrated": True, "films": 3, "of_test": 4,
                               "per_class": [1, 1, 1], "mean_confidence": 0.9}
    assert found.line() == ("pseudo-labels: 3 of 4 test films from run src (calibrated p >= 0.85), by class 1 / 1 / 1")
    assert pseudo.select(run, TEST_IDS, 0.5).rows.tolist() == [0, 1, 2, 3]


def test_a_run_name_is_looked_up_under_outputs(tmp_path: Path) -> None:
    from lungs_utils.paths import outputs_dir

    source_run(outputs_dir() / "named", PROBS, calibrated=False)
    found = pseudo.select("named", TEST_IDS, 0.9)
    assert found.rows.tolist() == [1, 2] and not found.calibrated


def test_no_confident_film_warns_and_adds_nothing(tmp_path: Path) -> None:
    run = source_run(tmp_path / "src", PROBS)
    with pytest.warns(DataWarning, match="no test film of run src reaches p >= 0.99 \\(the highest: 0.950\\)"):
        found = pseudo.select(run, TEST_IDS, 0.99)
    assert len(found) == 0 and found.summary()["mean_confidence"] is None


@pytest.mark.parametrize("case, message", [
    ("missing", "no run folder"),
    ("itself", "is this run itself"),
    ("other films", "predicted other test films than these .* first: 11"),
    ("unfinished", "has no test_predictions.csv"),
    ("damaged", "not a readable CSV"),
])
def test_a_bad_source_is_one_line(tmp_path: Path, case: str, message: str) -> None:
    run = tmp_path / "src"
    if case != "missing":
        source_run(run, {k: v for k, v in PROBS.items() if case != "other films" or k != 11})
    if case == "unfinished":
        (run / "test_predictions.csv").unlink()
    if case == "damaged":
        (run / "test_predictions.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LungsError, match=message) as caught:
        pseudo.select(run, TEST_IDS, 0.9, own_run=run if case == "itself" else tmp_path / "me")
    assert "\n" not in str(caught.value)


def test_the_estimate_counts_the_pseudo_labelled_films_every_fold_trains_on() -> None:
    from lungs_utils.engine.estimate import Timings, cost

    values = P.load(overrides={"cv": 3, "epochs": 10, "image_size": 32, "start_size": None, "tta": False,
                               "audit": False})
    timed = Timings({32: 0.01}, 0.002, 0.0, "a test machine")
    plain, joined = cost(values, timed, 36, 6), cost(values, timed, 36, 6, n_extra=6)
    # 3 folds x 10 epochs x 6 more films x 10 ms; validation, prediction and the rest unchanged
    assert joined.parts["training"] - plain.parts["training"] == pytest.approx(3 * 10 * 6 * 0.01)
    assert {k: v for k, v in joined.parts.items() if k != "training"} == \
        {k: v for k, v in plain.parts.items() if k != "training"}
    assert joined.plan.startswith("3 fold(s) x 10 epochs x 24 train (+6 pseudo-labelled) + 12 held-out films")


def test_a_joined_dataset_reads_each_side_once_in_the_order_asked() -> None:
    rng = np.random.default_rng(0)
    films = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    tests = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    train = XrayDataset(films, [10, 11, 12, 13, 14], [0, 1, 2, 0, 1], indices=[0, 2, 4])
    extra = XrayDataset(tests, [20, 21, 22, 23], [-1, 2, -1, 0], indices=[1, 3])
    joined = JoinedDataset(train, extra)
    assert len(joined) == 5 and joined.labels.tolist() == [0, 2, 1, 2, 0] and joined.ids.tolist() == [10, 12, 14, 21, 23]
    items = joined.__getitems__([4, 0, 3, 2])
    assert [(label, i) for _, label, i in items] == [(0, 23), (0, 10), (2, 21), (1, 14)]
    assert np.array_equal(items[0][0][0].numpy(), tests[3]) and np.array_equal(items[3][0][0].numpy(), films[4])
    assert all(np.array_equal(a[0].numpy(), b[0].numpy()) for a, b in zip(items, [joined[i] for i in (4, 0, 3, 2)]))
    with pytest.raises(LungsError, match="both carry lung masks"):
        JoinedDataset(train, XrayDataset(tests, [20, 21, 22, 23], [0, 0, 0, 0], masks=tests))


@pytest.fixture(scope="module")
def ph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_phantom(tmp_path_factory, "pseudo", n_train=36, seed=5)


def quick(data: Path, **extra: object) -> dict:
    return P.load(overrides={"data_dir": str(data), "model": "simple_cnn", "epochs": 2, "image_size": 32,
                             "batch_size": 8, "device": "cpu", "cv": 3, "tta": False, "audit": False, **extra})


def test_a_pseudo_labelled_cv_run_trains_on_the_test_films_and_scores_on_labelled_ones(ph: Path) -> None:
    first = experiment.run(quick(ph, run_name="round1"), progress=False)
    probs = read_run_table(first.run_dir, "test_predictions.csv")
    from lungs_utils.engine import estimate

    timed = estimate.Timings({32: 0.01}, 0.002, 0.0, "a test machine")
    with pytest.MonkeyPatch.context() as mp:  # the films counted, not the timing
        mp.setattr(estimate, "time_steps", lambda *a, **k: timed)
        planned = estimate.for_params(quick(ph, run_name="round2", pseudo_labels="round1", pseudo_threshold=0.0))
    assert "x 24 train (+6 pseudo-labelled) + 12 held-out films" in planned.plan
    second = experiment.run(quick(ph, run_name="round2", pseudo_labels="round1", pseudo_threshold=0.0),
                            progress=False)
    order = np.searchsorted(probs["id"].to_numpy(), second.data.test.ids)
    expected = probs.loc[:, list(PROB_COLUMNS)].to_numpy().argmax(axis=1)[order]  # threshold 0: every film
    for part in second.parts:  # each fold trains on its 24 labelled films and all 6 test films
        assert isinstance(part.train, JoinedDataset) and len(part.train) == 24 + 6
        assert part.train.labels[-6:].tolist() == expected.tolist()
        assert part.train.ids[-6:].tolist() == second.data.test.ids.tolist()
        assert len(part.val) == 12 and set(part.val.ids) <= set(second.data.train.ids)
    m = json.loads((second.run_dir / "metrics.json").read_text())
    assert m["pseudo_labels"] == {"run": "round1", "threshold": 0.0, "calibrated": True, "films": 6, "of_test": 6,
                                  "per_class": np.bincount(expected, minlength=3).tolist(),
                                  "mean_confidence": m["pseudo_labels"]["mean_confidence"]}
    assert m["n_val"] == 36  # out-of-fold on the labelled films only
    assert json.loads((first.run_dir / "metrics.json").read_text())["pseudo_labels"] is None
    board = leaderboard.gather().set_index("run")  # the optimistic score is marked where runs are compared
    assert board.loc["round2", "val_set"] == "out-of-fold (+6 pseudo-labelled: optimistic)"
    assert board.loc["round1", "val_set"] == "out-of-fold"
    # Nothing above the threshold: the same run as without pseudo-labels, to the last probability.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        none = experiment.run(quick(ph, run_name="none", pseudo_labels="round1", pseudo_threshold=1.0), progress=False)
    again = experiment.run(quick(ph, run_name="plain"), progress=False)
    for name in ("oof_predictions.csv", "test_predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(none.run_dir / name), pd.read_csv(again.run_dir / name))
