"""Pseudo-labels: test films labelled by a finished run's test probabilities, added to the training films.

Opt-in with ``pseudo_labels: <run>`` (a name under ``outputs/`` or a folder) and ``pseudo_threshold``: every
test film whose probability of its most likely class in that run's ``test_predictions.csv`` is at least the
threshold joins each part's training films with that class as its label. A cross-validation run is the
natural source: its test probabilities are the fold models' calibrated probabilities averaged. Validation
(and a CV run's out-of-fold score) stays on labelled films only. A second round is a run whose
``pseudo_labels`` names the first pseudo-labelled run.

Two cautions go with it (docs/pseudo-labels.md): it uses the unlabelled test films, which a competition's
rules may forbid, and the out-of-fold score of a pseudo-labelled run is optimistic, because the test labels
were learned from every train film, the held-out ones included. Torch-free.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import NUM_CLASSES
from ..errors import DataWarning, LungsError
from ..paths import named_run
from ..runfolder import RunFolder
from .submission import PROB_COLUMNS, TEST_FILE, read_run_table


@dataclass(frozen=True)
class PseudoLabels:
    """The test films a run labels confidently: their rows in the test set, labels and confidences."""

    run: str  # the source run's folder name
    threshold: float
    calibrated: bool  # whether the source's probabilities were temperature-calibrated
    rows: np.ndarray  # rows of the test set (aligned with LungsData.test)
    labels: np.ndarray
    confidence: np.ndarray
    n_test: int

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict[str, Any]:
        """What a run records about its pseudo-labels (metrics.json ``pseudo_labels``)."""
        return {"run": self.run, "threshold": self.threshold, "calibrated": self.calibrated, "films": len(self),
                "of_test": self.n_test, "per_class": np.bincount(self.labels, minlength=NUM_CLASSES).tolist(),
                "mean_confidence": round(float(self.confidence.mean()), 4) if len(self) else None}

    def line(self) -> str:
        """One line for the notebook: how many films, from where, by class."""
        per_class = " / ".join(str(n) for n in np.bincount(self.labels, minlength=NUM_CLASSES))
        return (f"pseudo-labels: {len(self)} of {self.n_test} test films from run {self.run} "
                f"({'calibrated ' if self.calibrated else 'raw '}p >= {self.threshold:g}), by class {per_class}")


def select(source: str | os.PathLike[str], test_ids: np.ndarray, threshold: float,
           own_run: Path | None = None) -> PseudoLabels:
    """The test films (``test_ids``, in the test set's order) that run ``source`` predicts with a top-class
    probability of at least ``threshold``. Refused in one line: a missing or unfinished run, this run
    itself, a run that predicted other test films, a damaged table."""
    folder = named_run(source)
    if not folder.is_dir():
        raise LungsError(f"pseudo_labels {str(source)!r}: no run folder {folder}; train that run first "
                         "(e.g. lungs run params/cpu_cv.yaml) or fix pseudo_labels")
    if own_run is not None and folder.resolve() == Path(own_run).resolve():
        raise LungsError(f"pseudo_labels {str(source)!r} is this run itself: name the finished run whose test "
                         "predictions label the test films")
    table = read_run_table(folder, TEST_FILE)
    ids = np.asarray(test_ids, dtype=np.int64)
    given = table["id"].to_numpy(np.int64)
    if len(given) != len(ids) or not np.array_equal(np.sort(given), np.sort(ids)):
        other = np.setdiff1d(ids, given)
        raise LungsError(f"pseudo_labels {str(source)!r} predicted other test films than these ({len(given)} rows; "
                         f"{len(other)} of the {len(ids)} test ids missing, first: "
                         f"{int(other[0]) if len(other) else int(np.setdiff1d(given, ids)[0])}): use a run made "
                         "on this dataset")
    order = np.searchsorted(given, ids)  # read_run_table sorts by id
    probs = table.loc[:, list(PROB_COLUMNS)].to_numpy(np.float64)[order]
    confidence = probs.max(axis=1)
    rows = np.flatnonzero(confidence >= threshold)
    found = PseudoLabels(RunFolder(folder).name, float(threshold), _calibrated(folder), rows,
                         probs.argmax(axis=1)[rows].astype(np.int64), confidence[rows], len(ids))
    if not len(found):
        warnings.warn(f"pseudo_labels: no test film of run {found.run} reaches p >= {threshold:g} (the highest: "
                      f"{confidence.max():.3f}); training uses the labelled films only", DataWarning, stacklevel=2)
    return found


def _calibrated(folder: Path) -> bool:
    calibration = RunFolder(folder).metrics.get("calibration")
    return bool(isinstance(calibration, dict) and calibration.get("applied"))
