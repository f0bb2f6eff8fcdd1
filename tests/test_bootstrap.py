"""Bootstrap intervals: the same figures as a plain loop, honest coverage, paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from lungs_utils.stats import bootstrap as B
from lungs_utils.stats.metrics import macro_f1


def labels(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    wrong = rng.random(n) > accuracy
    return y, np.where(wrong, (y + rng.integers(1, 3, n)) % 3, y)


def test_the_interval_is_the_percentiles_of_a_plain_resampling_loop() -> None:
    y, p = labels(150, 0.8)
    ci = B.f1_interval(y, p, n_boot=400, seed=3)
    assert ci.value == pytest.approx(macro_f1(y, p)) and ci.n == 150
    # The same resamples, scored one by one with the project's macro-F1.
    plain = []
    for counts in B.resample_counts(150, 400, seed=3):
        for row in counts:
            idx = np.repeat(np.arange(150), row.astype(int))
            plain.append(macro_f1(y[idx], p[idx]))
    low, high = np.percentile(plain, [2.5, 97.5])
    assert ci.low == pytest.approx(low) and ci.high == pytest.approx(high)
    assert ci.low < ci.value < ci.high


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    # A population whose macro-F1 is known; samples of 120 images, as a validation split holds.
    y_pop, p_pop = labels(200_000, 0.8, seed=1)
    truth = macro_f1(y_pop, p_pop)
    rng = np.random.default_rng(2)
    hits = 0
    for k in range(200):
        idx = rng.integers(0, len(y_pop), 120)
        ci = B.f1_interval(y_pop[idx], p_pop[idx], n_boot=500, seed=k)
        hits += ci.low <= truth <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_width_shrinks_with_more_images() -> None:
    small = B.f1_interval(*labels(120, 0.8), n_boot=500)
    large = B.f1_interval(*labels(1200, 0.8), n_boot=500)
    assert (large.high - large.low) < 0.5 * (small.high - small.low)
    assert 0.08 < small.high - small.low < 0.25  # 120 images: several points either way


def test_paired_difference_is_narrower_than_two_separate_intervals() -> None:
    y, a = labels(240, 0.85, seed=4)
    b = a.copy()
    flip = np.flatnonzero(a == y)[:6]  # b is a with six right answers made wrong
    b[flip] = (y[flip] + 1) % 3
    diff = B.paired_f1_difference(y, a, b, n_boot=800)
    assert diff.value == pytest.approx(macro_f1(y, a) - macro_f1(y, b)) and diff.value > 0
    assert diff.low > 0  # six images, always in a's favour: clear, when paired
    ia, ib = B.f1_interval(y, a, n_boot=800), B.f1_interval(y, b, n_boot=800)
    assert ib.high > ia.low  # unpaired, the two intervals overlap
    assert diff.verdict == B.AHEAD and diff.gap_text().startswith(f"ahead: {diff.value:+.3f} macro-F1 (95% CI")
    same = B.paired_f1_difference(y, a, a, n_boot=200)
    assert same.value == same.low == same.high == 0.0
    assert B.Interval(0.01, -0.02, 0.04, 100).gap_text() == "within noise: +0.010 macro-F1 (95% CI -0.020 to +0.040)"
    assert B.Interval(-0.05, -0.08, -0.01, 100).verdict == B.BEHIND
    assert B.Interval(0.0, float("nan"), float("nan"), 0).gap_text() == B.NOT_COMPARABLE


def test_mean_interval_ignores_nan_and_empty_input_is_nan() -> None:
    values = np.r_[np.linspace(0, 1, 101), np.nan]
    ci = B.mean_interval(values, n_boot=500)
    assert ci.value == pytest.approx(0.5) and ci.n == 101 and ci.low < 0.5 < ci.high
    assert np.isnan(B.mean_interval([np.nan]).value) and B.mean_interval([]).n == 0
    empty = B.f1_interval([], [])
    assert empty.n == 0 and np.isnan(empty.low)
    assert str(ci).startswith("0.500 (95% CI")


def test_resamples_come_in_chunks_that_sum_to_n() -> None:
    chunks = list(B.resample_counts(50, 600, seed=0))
    assert [len(c) for c in chunks] == [250, 250, 100]
    assert all((c.sum(axis=1) == 50).all() for c in chunks)
    again = list(B.resample_counts(50, 600, seed=0))
    assert all((a == b).all() for a, b in zip(chunks, again))  # seeded
