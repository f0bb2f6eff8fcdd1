"""How sure is a figure? Bootstrap intervals over images, for one run and for the gap between two.

A validation set of 120-240 films moves macro-F1 by several points from one draw to the next, so every
figure that decides something (which run is best, whether masks help, whether the audit flags a model)
comes with a 95 % interval: the images are resampled with replacement ``n_boot`` times and the figure is
recomputed on each resample (percentile bootstrap, Efron & Tibshirani 1993). Two runs scored on the
same images are compared **paired**: each resample scores both on the same images, so the interval is
that of their difference, much narrower than the two separate intervals suggest.

Resamples are multinomial image counts ``(B, N)``, so a resampled confusion matrix or mean is one matrix
product; they come in chunks, which keeps memory flat at competition size (27,000 images). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import NUM_CLASSES

#: Resamples per interval: enough for stable 2.5 / 97.5 % percentiles (their Monte-Carlo error is well
#: under 0.005 of macro-F1 at 120+ images).
N_BOOT = 2000
LEVEL = 0.95
#: Resamples drawn at once (memory: CHUNK x N counts).
CHUNK = 250
#: A paired gap in words: the only answers the suite gives (leaderboard, ``lungs score``, ``lungs pipeline``,
#: ensembles): ahead or behind when the interval of the gap excludes 0, else within noise.
AHEAD, BEHIND, WITHIN_NOISE, NOT_COMPARABLE = "ahead", "behind", "within noise", "not comparable"


@dataclass(frozen=True)
class Interval:
    """A figure, its bootstrap interval and the number of images it rests on."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f} to {self.high:.3f}, n={self.n})"

    @property
    def verdict(self) -> str:
        """This interval read as a paired gap: :data:`AHEAD`, :data:`BEHIND` or :data:`WITHIN_NOISE`."""
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return NOT_COMPARABLE
        return AHEAD if self.low > 0 else BEHIND if self.high < 0 else WITHIN_NOISE

    def gap_text(self, what: str = "macro-F1") -> str:
        """A paired gap in plain words: ``within noise: +0.004 macro-F1 (95% CI -0.020 to +0.028)``."""
        if self.verdict == NOT_COMPARABLE:
            return NOT_COMPARABLE
        return f"{self.verdict}: {self.value:+.3f} {what} (95% CI {self.low:+.3f} to {self.high:+.3f})"


def resample_counts(n: int, n_boot: int = N_BOOT, seed: int = 0) -> Iterator[np.ndarray]:
    """Chunks ``(b, n)`` of how often each of ``n`` images is drawn in each resample (rows sum to ``n``)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(CHUNK, n_boot - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64) if n else np.zeros((b, 0))
        done += b


def _macro_f1_rows(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in ``(B, C, C)`` (a class never predicted or absent scores 0, as
    in :func:`lungs_utils.stats.metrics.from_confusion`)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    predicted, support = cm.sum(axis=1), cm.sum(axis=2)
    denom = predicted + support
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def _cells(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """One-hot ``(N, C*C)`` of each image's confusion-matrix cell."""
    t, p = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{len(t)} labels but {len(p)} predictions")
    onehot = np.zeros((len(t), NUM_CLASSES * NUM_CLASSES))
    onehot[np.arange(len(t)), t * NUM_CLASSES + p] = 1.0
    return onehot


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _f1_value(cells: np.ndarray) -> float:
    """Macro-F1 of all the images: the statistic the resamples scatter around."""
    return float(_macro_f1_rows(cells.sum(axis=0).reshape(1, NUM_CLASSES, NUM_CLASSES))[0])


def _f1_samples(cells: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    out = [_macro_f1_rows((w @ cells).reshape(-1, NUM_CLASSES, NUM_CLASSES))
           for w in resample_counts(len(cells), n_boot, seed)]
    return np.concatenate(out)


def f1_interval(y_true: Any, y_pred: Any, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """Macro-F1 of hard labels with its percentile-bootstrap interval over images."""
    cells = _cells(y_true, y_pred)
    value = _f1_value(cells)
    if len(cells) == 0:
        return Interval(value, float("nan"), float("nan"), 0, level)
    return Interval(value, *_percentiles(_f1_samples(cells, n_boot, seed), level), len(cells), level)


def paired_f1_difference(y_true: Any, pred_a: Any, pred_b: Any, *, n_boot: int = N_BOOT, level: float = LEVEL,
                         seed: int = 0) -> Interval:
    """Macro-F1 of ``pred_a`` minus that of ``pred_b`` on the same images, with a paired bootstrap
    interval (both scored on each resample); :attr:`Interval.verdict` reads it."""
    a, b = _cells(y_true, pred_a), _cells(y_true, pred_b)
    value = _f1_value(a) - _f1_value(b)
    if len(a) == 0:
        return Interval(value, float("nan"), float("nan"), 0, level)
    # The same seed draws the same resamples for both: each difference is taken on one resample.
    diffs = _f1_samples(a, n_boot, seed) - _f1_samples(b, n_boot, seed)
    return Interval(value, *_percentiles(diffs, level), len(a), level)


def mean_interval(values: Any, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of per-image values (NaN ignored) with its bootstrap interval."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    means = np.concatenate([w @ v / len(v) for w in resample_counts(len(v), n_boot, seed)])
    return Interval(float(v.mean()), *_percentiles(means, level), len(v), level)
