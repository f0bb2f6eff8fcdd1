"""Decisions tuned for macro-F1: per-class offsets added to the log-probabilities before the argmax.

The argmax of calibrated probabilities maximises accuracy, not macro-F1: when one class is harder
than the others, moving the boundary towards it can raise the mean of the per-class F1 scores. The
offsets (class 0 fixed at 0) are fitted on validation probabilities by a grid search, and among equal
scores the smallest shift wins (the plain argmax when nothing beats it).

Fitting and scoring on the same images would flatter the result, so :func:`crossfit` estimates the
gain honestly: fit on one half of the validation set, score on the other half, both ways, over
several random halvings. The tuned decision is worth using only when that estimate is clearly above
zero (``tune_decision`` in params; see docs/research-log.md, "Decisions tuned for macro-F1").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import NUM_CLASSES
from .metrics import from_confusion, macro_f1

#: Offsets tried for classes 1 and 2 (log-probability units; exp(1.5) = 4.5x odds either way).
GRID = np.round(np.arange(-1.5, 1.5001, 0.05), 4)
_EPS = 1e-7


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))


def apply_offsets(probs: np.ndarray, offsets: np.ndarray | list[float]) -> np.ndarray:
    """Labels ``(N,)`` = argmax of log-probabilities plus ``offsets`` ``(C,)``."""
    return (_log(probs) + np.asarray(offsets, dtype=np.float64)).argmax(axis=1)


def adjusted_probs(probs: np.ndarray, offsets: np.ndarray | list[float]) -> np.ndarray:
    """Probabilities re-weighted by ``exp(offsets)`` and renormalised (their argmax is :func:`apply_offsets`)."""
    z = _log(probs) + np.asarray(offsets, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_offsets(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """The offsets ``(3,)`` (first one 0) that maximise macro-F1 on ``(probs, y_true)``; ties go to the
    smallest shift, so a plateau that includes the plain argmax keeps it."""
    logp, y = _log(probs), np.asarray(y_true, dtype=np.int64)
    base = y * NUM_CLASSES
    best, best_norm, best_offsets = -1.0, np.inf, np.zeros(NUM_CLASSES)
    for b1 in GRID:
        # All b2 values at once: (G, N) predictions → (G, 3, 3) confusion matrices.
        shifted = logp[None, :, :] + np.stack([np.zeros_like(GRID), np.full_like(GRID, b1), GRID], axis=1)[:, None, :]
        pred = shifted.argmax(axis=2)
        index = np.arange(len(GRID))[:, None] * NUM_CLASSES ** 2 + base[None, :] + pred
        cms = np.bincount(index.ravel(), minlength=len(GRID) * NUM_CLASSES ** 2).reshape(
            len(GRID), NUM_CLASSES, NUM_CLASSES)
        for b2, cm in zip(GRID, cms):
            score = from_confusion(cm)["macro_f1"]
            norm = b1 * b1 + b2 * b2
            if score > best + 1e-12 or (abs(score - best) <= 1e-12 and norm < best_norm):
                best, best_norm, best_offsets = score, norm, np.array([0.0, b1, b2])
    return best_offsets


def stratified_halves(y_true: np.ndarray, repeats: int = 10, seed: int = 0
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(fit_rows, score_rows)`` boolean masks: each of ``repeats`` random halvings of every class, used
    both ways round. For honest estimates of anything fitted on a validation set."""
    y = np.asarray(y_true, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        half = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == c))
            half[rows[: len(rows) // 2]] = True
        for fit_rows, score_rows in ((half, ~half), (~half, half)):
            if fit_rows.any() and score_rows.any():
                yield fit_rows, score_rows


def crossfit(probs: np.ndarray, y_true: np.ndarray, repeats: int = 10, seed: int = 0) -> dict[str, Any]:
    """Honest estimate of what tuned offsets buy: stratified halves, fit on one, score on the other.

    Returns ``plain`` (macro-F1 of the plain argmax on the scored halves), ``tuned`` (of the offsets
    fitted on the other half), ``gain`` = tuned - plain (means over ``repeats`` x 2 halves) and
    ``gain_std`` (their spread).
    """
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y_true, dtype=np.int64)
    plain, tuned = [], []
    for fit_rows, score_rows in stratified_halves(y, repeats, seed):
        offsets = fit_offsets(probs[fit_rows], y[fit_rows])
        plain.append(macro_f1(y[score_rows], probs[score_rows].argmax(axis=1)))
        tuned.append(macro_f1(y[score_rows], apply_offsets(probs[score_rows], offsets)))
    gains = np.array(tuned) - np.array(plain)
    return {"plain": float(np.mean(plain)) if plain else float("nan"),
            "tuned": float(np.mean(tuned)) if tuned else float("nan"),
            "gain": float(gains.mean()) if len(gains) else float("nan"),
            "gain_std": float(gains.std()) if len(gains) else float("nan"),
            "repeats": repeats}


def tune(val_probs: np.ndarray, y_true: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Offsets fitted on the whole validation set plus the cross-fitted estimate of their gain."""
    offsets = fit_offsets(val_probs, y_true)
    return {"offsets": [float(v) for v in offsets], "crossfit": crossfit(val_probs, y_true, seed=seed),
            "val_macro_f1_fitted": macro_f1(y_true, apply_offsets(val_probs, offsets))}
