"""Metrics equal scikit-learn's on whole sets, and do not depend on how the set is batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from lungs_utils.stats import metrics as M


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    got = M.classification_metrics(y, p)
    assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=[0, 1, 2], zero_division=0)
    for c, name in enumerate(["normal", "other disease", "COVID-19"]):
        assert got["per_class"][name]["precision"] == pytest.approx(prec[c])
        assert got["per_class"][name]["recall"] == pytest.approx(rec[c])
        assert got["per_class"][name]["f1"] == pytest.approx(f1[c])
        assert got["per_class"][name]["support"] == sup[c]
    assert got["confusion_matrix"] == confusion_matrix(y, p, labels=[0, 1, 2]).tolist()


def test_hand_computed_example() -> None:
    # true:  0 0 1 1 2 2 ; pred: 0 1 1 1 2 0
    got = M.classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0])
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=0.8; class 2: P=1 R=1/2 F1=2/3
    assert got["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert got["accuracy"] == pytest.approx(4 / 6)


def test_missing_class_uses_zero_division_zero() -> None:
    got = M.classification_metrics([0, 0, 1], [0, 0, 0])
    assert got["per_class"]["COVID-19"]["f1"] == 0.0
    assert got["macro_f1"] == pytest.approx(f1_score([0, 0, 1], [0, 0, 0], labels=[0, 1, 2], average="macro",
                                                     zero_division=0))


def test_batched_accumulation_equals_whole_set_not_the_mean_of_batches() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 103)
    p = np.where(rng.random(103) < 0.6, y, rng.integers(0, 3, 103))
    cm = M.ConfusionMatrix()
    per_batch = []
    for start in range(0, 103, 16):  # uneven last batch, nothing dropped
        yb, pb = torch.tensor(y[start:start + 16]), torch.tensor(p[start:start + 16])
        cm.update(yb, pb)
        per_batch.append(f1_score(yb, pb, average="macro"))
    whole = M.from_confusion(cm.matrix())["macro_f1"]
    assert whole == pytest.approx(f1_score(y, p, average="macro"))
    assert abs(whole - np.mean(per_batch)) > 1e-3  # the original project's averaging is biased


def test_unlabelled_rows_are_ignored() -> None:
    cm = M.ConfusionMatrix()
    cm.update(torch.tensor([0, -1, 2]), torch.tensor([0, 1, 2]))
    assert cm.matrix().sum() == 2


def test_flat_keys() -> None:
    row = M.flat(M.classification_metrics([0, 1, 2], [0, 1, 2]))
    assert set(row) == {"val_accuracy", "val_macro_f1", "val_f1_normal", "val_f1_other", "val_f1_covid"}


def test_one_macro_f1_for_every_path_when_a_class_is_missing(tmp_path) -> None:
    """COVID-19 absent from truth and predictions: scikit-learn's default macro would average two classes
    (0.9); the competition's three-class mean is 0.6. Epoch metrics, predictions' metrics, ensembles,
    decisions and `lungs score` all give the same value."""
    import pandas as pd

    from lungs_utils.stats import decision
    from lungs_utils.analysis import ensemble
    from lungs_utils.stats.scoring import score_submission

    y, p = np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 1])
    expected = M.from_confusion(M.classification_metrics(y, p)["confusion_matrix"])["macro_f1"]
    assert expected == pytest.approx((0.8 + 0.8 + 0.0) / 3)
    assert f1_score(y, p, average="macro") == pytest.approx(0.8)  # what ensemble.py used to report
    meter = M.ConfusionMatrix()
    meter.update(torch.tensor(y), torch.tensor(p))
    assert M.from_confusion(meter.matrix())["macro_f1"] == pytest.approx(expected)  # epoch metrics
    assert M.macro_f1(y, p) == ensemble.macro_f1(y, p) == decision.macro_f1(y, p) == pytest.approx(expected)
    truth, sub = tmp_path / "truth.csv", tmp_path / "sub.csv"
    pd.DataFrame({"id": range(5), "target_feature": y}).to_csv(truth, index=False)
    pd.DataFrame({"id": range(5), "target_feature": p}).to_csv(sub, index=False)
    assert score_submission(sub, truth)["macro_f1"] == pytest.approx(expected)  # lungs score
