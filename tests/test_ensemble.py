"""Ensembles of run folders: alignment, the three methods, and the written run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungs_utils.analysis import ensemble as E
from lungs_utils.errors import LungsError
from lungs_utils.xrays.submission import validate_submission

VAL_IDS = np.arange(30) * 2 + 1
TEST_IDS = np.arange(12) * 2 + 100
Y_TRUE = np.arange(30) % 3


def make_run(root: Path, name: str, val_probs: np.ndarray, test_probs: np.ndarray | None = None,
             val_ids: np.ndarray = VAL_IDS, y_true: np.ndarray = Y_TRUE, test_ids: np.ndarray = TEST_IDS,
             model: str | None = "small_cnn") -> Path:
    """A run folder with hand-made prediction CSVs (rows deliberately not sorted by id)."""
    run = root / name
    run.mkdir(parents=True)
    if test_probs is None:
        test_probs = np.full((len(test_ids), 3), 1 / 3)
    val = pd.DataFrame({"id": val_ids, "true": y_true, "predicted": val_probs.argmax(axis=1),
                        "p0": val_probs[:, 0], "p1": val_probs[:, 1], "p2": val_probs[:, 2]})
    test = pd.DataFrame({"id": test_ids, "p0": test_probs[:, 0], "p1": test_probs[:, 1],
                         "p2": test_probs[:, 2]})
    val.iloc[::-1].to_csv(run / "val_predictions.csv", index=False)
    test.iloc[::-1].to_csv(run / "test_predictions.csv", index=False)
    if model:
        (run / "params.yaml").write_text(f"model: {model}\nseed: 0\n")
    return run


def random_probs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(3), size=n)


def good_probs(y: np.ndarray, seed: int, noise: float = 0.3) -> np.ndarray:
    """Probabilities that favour the true class, with a few mistakes."""
    p = np.eye(3)[y] + noise * np.random.default_rng(seed).random((len(y), 3)) * 3
    return p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- loading
def test_load_member_reads_and_sorts(tmp_path: Path) -> None:
    probs = random_probs(30, 0)
    member = E.load_member(make_run(tmp_path, "a", probs))
    assert member.name == "a" and member.model == "small_cnn"
    assert member.val["id"].tolist() == sorted(VAL_IDS.tolist())
    assert list(member.test.columns) == ["id", "p0", "p1", "p2"]
    np.testing.assert_allclose(member.val[["p0", "p1", "p2"]].to_numpy(), probs)


def test_load_member_missing_files(tmp_path: Path) -> None:
    run = make_run(tmp_path, "half", random_probs(30, 0))
    (run / "test_predictions.csv").unlink()
    with pytest.raises(LungsError, match="run half has no test_predictions.csv.*run its notebook to the end"):
        E.load_member(run)
    (run / "val_predictions.csv").unlink()
    with pytest.raises(LungsError, match="run half has no val_predictions.csv"):
        E.load_member(run)
    with pytest.raises(LungsError, match="does not exist"):
        E.load_member(tmp_path / "ghost")


def test_load_member_bad_columns(tmp_path: Path) -> None:
    run = make_run(tmp_path, "old", random_probs(30, 0))
    pd.DataFrame({"id": [1], "prob": [0.5]}).to_csv(run / "val_predictions.csv", index=False)
    with pytest.raises(LungsError, match=r"missing column\(s\) true, predicted, p0"):
        E.load_member(run)


# ----------------------------------------------------------------------------------------------- alignment
def test_misaligned_val_ids_is_an_error(tmp_path: Path) -> None:
    a = E.load_member(make_run(tmp_path, "a", random_probs(30, 0)))
    b = E.load_member(make_run(tmp_path, "b", random_probs(30, 1), val_ids=VAL_IDS + 1))
    differs = "run b has a different validation set from run a.*seed or val_fraction"
    with pytest.raises(LungsError, match=differs):
        E.align([a, b])
    with pytest.raises(LungsError, match="run b"):
        E.combine([a, b], "mean")


def test_misaligned_labels_and_test_ids(tmp_path: Path) -> None:
    a = E.load_member(make_run(tmp_path, "a", random_probs(30, 0)))
    c = E.load_member(make_run(tmp_path, "c", random_probs(30, 1), y_true=(Y_TRUE + 1) % 3))
    d = E.load_member(make_run(tmp_path, "d", random_probs(30, 2), test_ids=TEST_IDS[:-1],
                               test_probs=random_probs(11, 3)))
    with pytest.raises(LungsError, match="run c: true label of id 1 differs from run a"):
        E.align([a, c])
    with pytest.raises(LungsError, match="run d predicted a different test set"):
        E.align([a, d])


def test_align_shapes(tmp_path: Path) -> None:
    members = [E.load_member(make_run(tmp_path, n, random_probs(30, i))) for i, n in enumerate("abc")]
    val_ids, y_true, val_probs, test_ids, test_probs = E.align(members)
    assert val_probs.shape == (3, 30, 3) and test_probs.shape == (3, 12, 3)
    assert val_ids.tolist() == sorted(VAL_IDS.tolist()) and len(y_true) == 30 and len(test_ids) == 12


def test_no_members_and_duplicates_and_unknown_method(tmp_path: Path) -> None:
    with pytest.raises(LungsError, match="no runs"):
        E.align([])
    a = E.load_member(make_run(tmp_path, "a", random_probs(30, 0)))
    with pytest.raises(LungsError, match="more than once"):
        E.combine([a, a])
    with pytest.raises(LungsError, match="unknown ensemble method 'median'"):
        E.combine([a], "median")


# ----------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", E.METHODS)
def test_identical_members_equal_the_member(tmp_path: Path, method: str) -> None:
    probs, test = good_probs(Y_TRUE, 0, noise=0.5), random_probs(12, 9)
    members = [E.load_member(make_run(tmp_path, n, probs, test)) for n in ("a", "b", "c")]
    single = E.combine(members[:1], method)
    result = E.combine(members, method)
    assert result.val_f1 == pytest.approx(single.val_f1) == pytest.approx(result.members_f1["a"])
    assert result.val_frame["predicted"].tolist() == list(probs[np.argsort(VAL_IDS)].argmax(axis=1))
    assert result.submission.equals(single.submission)
    assert sum(result.weights.values()) == pytest.approx(1.0)
    if method != "vote":  # a vote outputs vote shares, not the members' probabilities
        np.testing.assert_allclose(result.val_frame[["p0", "p1", "p2"]].to_numpy(), probs, rtol=1e-6)
        np.testing.assert_allclose(result.test_frame[["p0", "p1", "p2"]].to_numpy(), test, rtol=1e-6)


def test_weighted_prefers_the_good_member(tmp_path: Path) -> None:
    good = E.load_member(make_run(tmp_path, "good", good_probs(Y_TRUE, 1)))
    noise = E.load_member(make_run(tmp_path, "random", random_probs(30, 2)))
    result = E.combine([noise, good], "weighted")
    assert result.weights["good"] >= 0.9
    assert result.val_f1 >= max(result.members_f1.values())
    assert result.members_f1["good"] > result.members_f1["random"]


def test_weighted_never_below_best_member(tmp_path: Path) -> None:
    members = [E.load_member(make_run(tmp_path, f"m{i}", good_probs(Y_TRUE, i, noise=0.8))) for i in range(4)]
    result = E.combine(members, "weighted", rounds=10)
    assert result.val_f1 >= max(result.members_f1.values())
    mean = E.combine(members, "mean")
    assert mean.weights == {f"m{i}": pytest.approx(0.25) for i in range(4)}


def test_vote_majority_and_tie_break(tmp_path: Path) -> None:
    n = 4
    ids, y = VAL_IDS[:n], np.array([0, 1, 2, 0])
    # Each member's labels per image; image 3 is a three-way tie, broken by the mean probability.
    votes = np.array([[0, 1, 2, 0], [0, 2, 2, 1], [1, 1, 0, 2]])
    members = []
    for m, labels in enumerate(votes):
        p = 0.2 * np.ones((n, 3))
        p[np.arange(n), labels] = 0.6
        if m == 2:
            p[3] = [0.05, 0.05, 0.9]  # the most confident vote in the tie
        members.append(E.load_member(make_run(tmp_path, f"v{m}", p, val_ids=ids, y_true=y,
                                              test_ids=ids + 1000, test_probs=p)))
    result = E.combine(members, "vote")
    assert result.val_frame["predicted"].tolist() == [0, 1, 2, 2]
    assert result.submission["target_feature"].tolist() == [0, 1, 2, 2]
    shares = result.val_frame[["p0", "p1", "p2"]].to_numpy()
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(shares[0], [2 / 3, 1 / 3, 0], atol=0.01)
    assert result.val_f1 == pytest.approx(E.macro_f1(y, np.array([0, 1, 2, 2])))


# ----------------------------------------------------------------------------------------------- output
def test_write_ensemble_writes_a_run_folder(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, n, good_probs(Y_TRUE, i), random_probs(12, i)) for i, n in enumerate("ab")]
    out = tmp_path / "ens"
    result = E.ensemble_runs(runs, out, "weighted")
    assert sorted(p.name for p in out.iterdir()) == ["ensemble.json", "metrics.json", "submission.csv",
                                                     "test_predictions.csv", "val_predictions.csv"]
    assert (out / "val_predictions.csv").read_text().splitlines()[0] == "id,true,predicted,p0,p1,p2"
    assert (out / "test_predictions.csv").read_text().splitlines()[0] == "id,p0,p1,p2"
    validate_submission(out / "submission.csv", test_ids=TEST_IDS)
    summary = json.loads((out / "ensemble.json").read_text())
    assert summary["method"] == "weighted" and set(summary["weights"]) == {"a", "b"}
    assert summary["val_macro_f1"] == pytest.approx(result.val_f1) and "optimistic" in summary["note"]
    assert set(summary["members_val_macro_f1"]) == {"a", "b"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_macro_f1"] == pytest.approx(result.val_f1)
    assert 0 <= metrics["val_accuracy"] <= 1
    assert np.array(metrics["confusion_matrix"]).sum() == 30
    # The written folder is itself a valid ensemble member.
    again = E.load_member(out)
    assert again.val["predicted"].tolist() == result.val_frame["predicted"].tolist()


# ----------------------------------------------------------------------------------------------- honest check
def test_crossfit_says_when_weak_members_only_dilute_the_best_one(tmp_path: Path) -> None:
    from lungs_utils.analysis.report import ensemble_verdict

    y = np.arange(300) % 3
    ids = np.arange(300) * 2 + 1
    strong = good_probs(y, 0, noise=0.25)
    runs = [make_run(tmp_path, "strong", strong, val_ids=ids, y_true=y)]
    runs += [make_run(tmp_path, f"noise{k}", random_probs(300, k + 1), val_ids=ids, y_true=y) for k in range(2)]
    result = E.ensemble_runs(runs, method="mean")
    assert result.honest["gain"] < 0 and result.honest["best_member"] > result.honest["ensemble"]
    verdict = ensemble_verdict(result)
    assert "does NOT beat its best member" in verdict and "strong" in verdict


def test_crossfit_credits_members_whose_mistakes_differ(tmp_path: Path) -> None:
    from lungs_utils.analysis.report import ensemble_verdict

    y = np.arange(600) % 3
    ids = np.arange(600) * 2 + 1
    runs = [make_run(tmp_path, f"m{k}", good_probs(y, k, noise=0.9), val_ids=ids, y_true=y) for k in range(5)]
    result = E.ensemble_runs(runs, method="mean")
    assert result.honest["gain"] > result.honest["gain_std"] > 0
    assert ensemble_verdict(result).startswith("The ensemble beats its best member")
    written = json.loads((E.write_ensemble(result, tmp_path / "ens")["ensemble.json"]).read_text())
    assert written["crossfit_vs_best_member"]["gain"] == pytest.approx(result.honest["gain"])
