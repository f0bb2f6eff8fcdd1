"""Calibrated probabilities: temperature scaling (Guo et al. 2017), NLL, ECE and reliability bins.

A network trained with cross-entropy is usually over-confident on held-out images: a "95 %" answer
is right less often than 95 % of the time. One temperature ``T``, fitted on the validation
predictions by minimising their negative log-likelihood, divides the log-probabilities before the
softmax. It never changes the predicted class (so macro-F1 stays), but probabilities that mean what
they say average better in ensembles and read honestly in the notebooks.

The probabilities given here may already be averages (over TTA views): scaling their logarithm is the
same operation as scaling logits up to a per-image constant, which the softmax removes.
Torch-free: NumPy and SciPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Bins of the expected calibration error and of the reliability diagram (the usual choice).
ECE_BINS = 15
#: Search range of the temperature: beyond it a model is broken, not mis-calibrated.
T_RANGE = (0.05, 20.0)
#: Fewer validation images than this and the cross-fitted figures are not computed (too noisy).
MIN_CROSSFIT = 20
_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` row by row, float64 (N, C); T = 1 returns the rows renormalised."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true, dtype=np.int64)]
    return float(-np.log(np.clip(p, _EPS, 1.0)).mean()) if len(p) else float("nan")


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin (equal width on [0, 1]): ``count``, mean ``confidence`` and ``accuracy``
    of the top-class predictions (NaN where a bin is empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return {"edges": np.linspace(0.0, 1.0, bins + 1), "count": count, "confidence": confidence,
            "accuracy": accuracy}


def ece(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between confidence and accuracy."""
    r = reliability(probs, y_true, bins)
    if r["count"].sum() == 0:
        return float("nan")
    used = r["count"] > 0
    gaps = np.abs(r["confidence"][used] - r["accuracy"][used])
    return float((gaps * r["count"][used]).sum() / r["count"].sum())


def fit_temperature(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature minimising the NLL of ``probs`` (N, C) on ``y_true``; 1.0 without data."""
    from scipy.optimize import minimize_scalar

    if len(y_true) == 0:
        return 1.0
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))
    y = np.asarray(y_true, dtype=np.int64)

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())

    # NLL is convex in 1/T, so a bounded 1-D search in log T finds the one minimum.
    found = minimize_scalar(loss, bounds=tuple(np.log(T_RANGE)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def summary(probs: np.ndarray, y_true: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The temperature fitted on all of ``probs`` and what it buys.

    ``nll_*`` / ``ece_*`` before and after on the same images (in-sample), and ``crossfit_*``: fitted on
    one stratified half, scored on the other (5 halvings, both ways; an honest estimate for unseen
    images; None below :data:`MIN_CROSSFIT` images), with "before" scored on the same halves.
    """
    from .decision import stratified_halves

    y = np.asarray(y_true, dtype=np.int64)
    t = fit_temperature(probs, y)
    after = apply_temperature(probs, t)
    out: dict[str, Any] = {"temperature": t, "nll_before": nll(probs, y), "nll_after": nll(after, y),
                           "ece_before": ece(probs, y), "ece_after": ece(after, y), "bins": ECE_BINS,
                           "crossfit_nll_before": None, "crossfit_ece_before": None,
                           "crossfit_nll_after": None, "crossfit_ece_after": None}
    if len(y) >= MIN_CROSSFIT:
        p = np.asarray(probs, dtype=np.float64)
        scores = np.array([(nll(p[score], y[score]), ece(p[score], y[score]), nll(cal, y[score]), ece(cal, y[score]))
                           for fit_rows, score in stratified_halves(y, repeats=5, seed=seed)
                           for cal in [apply_temperature(p[score], fit_temperature(p[fit_rows], y[fit_rows]))]])
        # "before" on the same halves: ECE grows as bins thin out, so only same-size figures compare.
        (out["crossfit_nll_before"], out["crossfit_ece_before"], out["crossfit_nll_after"],
         out["crossfit_ece_after"]) = (float(v) for v in scores.mean(axis=0))
    return out
