"""Submissions scored against an answer key (``id,target_feature``), the way Kaggle's leaderboard would
score them, offline: macro-F1 with its 95 % interval, and several submissions' paired gaps to the first
(``lungs score``, ``lungs pipeline --answers``). Torch-free."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..xrays.submission import validate_submission
from .bootstrap import Interval, f1_interval, paired_f1_difference
from .metrics import classification_metrics


def _against(sub: pd.DataFrame | str | os.PathLike[str], truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) labels of a submission, aligned with the truth file's ids."""
    frame = validate_submission(sub, test_ids=truth["id"].tolist())
    merged = frame.merge(truth, on="id", suffixes=("_pred", ""))
    return merged["target_feature"].to_numpy(np.int64), merged["target_feature_pred"].to_numpy(np.int64)


def score_submission(sub: pd.DataFrame | str | os.PathLike[str], answers: str | os.PathLike[str]
                     ) -> dict[str, Any]:
    """Metrics of a submission against a truth file, e.g. the phantom's ``test_answers.csv``;
    ``macro_f1_ci`` is its 95 % bootstrap interval over the test images."""
    y, pred = _against(sub, validate_submission(answers))
    ci = f1_interval(y, pred)
    return {**classification_metrics(y, pred), "macro_f1_ci": [ci.low, ci.high]}


def compare_submissions(subs: Sequence[str | os.PathLike[str]], answers: str | os.PathLike[str]
                        ) -> list[dict[str, Any]]:
    """Each submission's macro-F1 against one truth file with its interval, and its gap to the first one,
    paired over the same test images (``vs_first``: an :class:`~lungs_utils.stats.bootstrap.Interval`;
    None for the first)."""
    truth = validate_submission(answers)
    scored = [(Path(s), *_against(s, truth)) for s in subs]
    rows = []
    for i, (path, y, pred) in enumerate(scored):
        ci = f1_interval(y, pred)
        gap: Interval | None = None if i == 0 else paired_f1_difference(y, pred, scored[0][2])
        rows.append({"file": str(path), "macro_f1": ci.value, "low": ci.low, "high": ci.high,
                     "accuracy": float((y == pred).mean()), "n": int(len(y)), "vs_first": gap})
    return rows
