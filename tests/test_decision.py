"""Decisions tuned for macro-F1: per-class offsets, and the honest (cross-fitted) estimate of their gain."""

from __future__ import annotations

import numpy as np
import pytest

from lungs_utils.stats import decision as D
from lungs_utils.stats.metrics import classification_metrics


def _probs(n: int, bias: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Informative logits with the COVID-19 logit pushed down by ``bias``: class 2 is under-predicted."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    logits[:, 2] -= bias
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


def test_offsets_undo_a_systematic_bias_and_the_crossfit_gain_is_real() -> None:
    probs, y = _probs(1500, bias=1.0)
    offsets = D.fit_offsets(probs, y)
    assert offsets[0] == 0.0 and offsets[2] == pytest.approx(1.0, abs=0.35)
    plain = classification_metrics(y, probs.argmax(axis=1))["macro_f1"]
    assert D.macro_f1(y, D.apply_offsets(probs, offsets)) > plain + 0.03
    est = D.crossfit(probs, y, repeats=3)
    assert est["gain"] > 0.02 and est["tuned"] > est["plain"]


def test_without_a_bias_offsets_stay_near_zero_and_crossfit_shows_no_gain() -> None:
    probs, y = _probs(1500, bias=0.0, seed=1)
    assert np.abs(D.fit_offsets(probs, y)).max() <= 0.35
    assert D.crossfit(probs, y, repeats=3)["gain"] < 0.01


def test_fitting_on_few_images_flatters_and_crossfit_says_so() -> None:
    probs, y = _probs(90, bias=0.3, seed=2)
    tuned = D.tune(probs, y)
    plain = classification_metrics(y, probs.argmax(axis=1))["macro_f1"]
    # In-sample the fitted offsets always look at least as good; the cross-fitted gain is smaller.
    assert tuned["val_macro_f1_fitted"] >= plain
    assert tuned["crossfit"]["gain"] < tuned["val_macro_f1_fitted"] - plain


def test_a_plateau_keeps_the_plain_argmax() -> None:
    y = np.array([0, 1, 2] * 10)
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3  # perfectly separated: every small shift scores the same
    assert D.fit_offsets(probs, y).tolist() == [0.0, 0.0, 0.0]


def test_adjusted_probabilities_agree_with_the_shifted_argmax() -> None:
    probs, _ = _probs(200, bias=0.5, seed=3)
    offsets = np.array([0.0, -0.3, 0.6])
    adj = D.adjusted_probs(probs, offsets)
    assert np.allclose(adj.sum(axis=1), 1.0)
    assert np.array_equal(adj.argmax(axis=1), D.apply_offsets(probs, offsets))


def test_a_run_with_tune_decision_submits_the_shifted_labels(tiny_data, tmp_path) -> None:
    import json

    import pandas as pd

    from lungs_utils.runs import experiment as E
    from lungs_utils import params as P
    from lungs_utils.analysis.report import decision_summary

    p = P.load(overrides=dict(epochs=1, image_size=32, batch_size=4, device="cpu", data_dir=str(tiny_data),
                              output_dir=str(tmp_path / "run"), tune_decision=True, val_fraction=0.5))
    exp = E.prepare(p, progress=False)
    E.train(exp, progress=False)
    summary = E.predict_and_save(exp, progress=False)
    tuned = json.loads((tmp_path / "run" / "metrics.json").read_text())["decision"]
    assert tuned == summary["decision"] and len(tuned["offsets"]) == 3 and "gain" in tuned["crossfit"]
    test = pd.read_csv(tmp_path / "run" / "test_predictions.csv")  # raw probabilities are kept
    submission = pd.read_csv(tmp_path / "run" / "submission.csv")
    expected = D.apply_offsets(test[["p0", "p1", "p2"]].to_numpy(), tuned["offsets"])
    assert submission["target_feature"].tolist() == expected.tolist()
    assert "Cross-fitted" in decision_summary(summary)
    assert decision_summary({"decision": None}) == ""
