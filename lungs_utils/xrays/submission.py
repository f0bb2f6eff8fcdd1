"""The run folder's prediction tables and the Kaggle submission: writing and validating them.

Files (the run-folder contract in docs/design.md): ``val_predictions.csv`` (``id,true,predicted,p0,p1,p2``),
``test_predictions.csv`` (``id,p0,p1,p2``) and ``submission.csv`` (``id,target_feature``), rows sorted by
id. No torch here: ``lungs score`` and ``lungs submit``'s checks start in a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import NUM_CLASSES
from ..errors import LungsError
from ..io import atomic_write_csv
from ..runfolder import METRICS_FILE, SPLIT_FILE, read_json
from .folds import Split
from .layout import check_labels, file_line, read_text_csv

PROB_COLUMNS: tuple[str, ...] = tuple(f"p{k}" for k in range(NUM_CLASSES))
VAL_COLUMNS: tuple[str, ...] = ("id", "true", "predicted", *PROB_COLUMNS)
TEST_COLUMNS: tuple[str, ...] = ("id", *PROB_COLUMNS)
SUBMISSION_COLUMNS: tuple[str, ...] = ("id", "target_feature")
VAL_FILE, TEST_FILE, SUBMISSION_FILE = "val_predictions.csv", "test_predictions.csv", "submission.csv"
#: A cross-validation run's out-of-fold predictions: every train image once, with the fold that held it out.
OOF_FILE = "oof_predictions.csv"
OOF_COLUMNS: tuple[str, ...] = (*VAL_COLUMNS, "fold")

# --------------------------------------------------------------------------------------------------
# Prediction tables
# --------------------------------------------------------------------------------------------------
def _check_probs(ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES or len(probs) != len(ids):
        raise ValueError(f"probs must have shape ({len(ids)}, {NUM_CLASSES}), got {probs.shape}")
    return probs


def val_frame(ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
              probs: np.ndarray) -> pd.DataFrame:
    """``id,true,predicted,p0,p1,p2`` sorted by id; ``predicted`` is the argmax of ``probs``."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    probs = _check_probs(ids, probs)
    if len(labels) != len(ids):
        raise ValueError(f"labels has {len(labels)} entries for {len(ids)} ids")
    # argmax before any float32 cast so ties resolved in higher precision (ensemble votes) survive.
    frame = pd.DataFrame({"id": ids, "true": labels, "predicted": probs.argmax(axis=1).astype(np.int64)})
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = probs[:, k].astype(np.float32)
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def test_frame(ids: Sequence[int] | np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """``id,p0,p1,p2`` sorted by id."""
    ids = np.asarray(ids, dtype=np.int64)
    probs = _check_probs(ids, probs)
    frame = pd.DataFrame({"id": ids})
    for k, col in enumerate(PROB_COLUMNS):
        frame[col] = probs[:, k].astype(np.float32)
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


test_frame.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def submission_frame(ids: Sequence[int] | np.ndarray, probs_or_labels: np.ndarray) -> pd.DataFrame:
    """Kaggle submission ``id,target_feature`` (int64) sorted by id, from (N,3) probs or (N,) labels."""
    ids = np.asarray(ids, dtype=np.int64)
    values = np.asarray(probs_or_labels)
    labels = _check_probs(ids, values).argmax(axis=1) if values.ndim == 2 else values
    if len(labels) != len(ids):
        raise ValueError(f"{len(labels)} labels for {len(ids)} ids")
    frame = pd.DataFrame({"id": ids, "target_feature": np.asarray(labels, dtype=np.int64)})
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def write_predictions(run_dir: str | os.PathLike[str], val: pd.DataFrame | None = None,
                      test: pd.DataFrame | None = None, *, submission: pd.DataFrame | None = None,
                      oof: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``val_predictions.csv`` / ``test_predictions.csv`` / ``submission.csv`` (and a cross-validation
    run's ``oof_predictions.csv``) atomically.

    ``submission`` defaults to the argmax of ``test``. Only the contract columns are written, rows
    sorted by id. Returns ``{file name: path}`` of what was written.
    """
    run_dir = Path(run_dir)
    written: dict[str, Path] = {}

    def put(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: frame lacks column(s) {', '.join(missing)}")
        frame = frame.loc[:, list(columns)].sort_values("id", kind="stable")
        atomic_write_csv(frame, run_dir / name)
        written[name] = run_dir / name

    if val is not None:
        put(val, VAL_COLUMNS, VAL_FILE)
    if oof is not None:
        put(oof, OOF_COLUMNS, OOF_FILE)
    if test is not None:
        put(test, TEST_COLUMNS, TEST_FILE)
        if submission is None:
            submission = submission_frame(test["id"].to_numpy(), test[list(PROB_COLUMNS)].to_numpy())
    if submission is not None:
        put(validate_submission(submission), SUBMISSION_COLUMNS, SUBMISSION_FILE)
    return written


# --------------------------------------------------------------------------------------------------
# Reading a run's tables back
# --------------------------------------------------------------------------------------------------
_COLUMNS = {VAL_FILE: VAL_COLUMNS, OOF_FILE: OOF_COLUMNS, TEST_FILE: TEST_COLUMNS}


def _rows_it_must_hold(run_dir: Path, name: str) -> tuple[np.ndarray | None, int | None]:
    """(ids, count) a run's table must hold: its held-out images (``split.csv``) for validation and
    out-of-fold predictions, else the count ``metrics.json`` recorded; None where the run does not say."""
    if name != TEST_FILE and (run_dir / SPLIT_FILE).is_file():
        return Split.read(run_dir / SPLIT_FILE).held_out_ids(), None
    count = read_json(run_dir / METRICS_FILE).get("n_test" if name == TEST_FILE else "n_val")
    return None, count if isinstance(count, int) else None


def read_run_table(run_dir: str | os.PathLike[str], name: str) -> pd.DataFrame:
    """A run folder's ``val_predictions.csv``, ``oof_predictions.csv`` or ``test_predictions.csv``, checked
    before anything uses it: its columns, numbers, each id once, and the rows it must hold (every held-out
    image of the run once; as many test rows as the run predicted). Sorted by id; a damaged file is one
    error line naming it, never used."""
    run_dir = Path(run_dir)
    path, run, columns = run_dir / name, run_dir.resolve().name, _COLUMNS[name]
    again = f"predict again (continue run {run} with -p resume=true, which only re-predicts a finished run)"
    if not path.is_file():
        raise LungsError(f"run {run} has no {name} ({path}): run its notebook to the end first")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        raise LungsError(f"{path} is empty or not a readable CSV; {again}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LungsError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(columns)}); {again}")
    frame = frame.loc[:, list(columns)]
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LungsError(f"{path}: line {i + 2}: {col} {frame[col].iloc[i]!r} is not a number; {again}")
        frame[col] = values
    integer = [c for c in ("id", "true", "predicted", "fold") if c in columns]
    frame[integer] = frame[integer].astype(np.int64)
    if frame["id"].duplicated().any():
        dup = int(frame["id"][frame["id"].duplicated()].iloc[0])
        raise LungsError(f"{path}: id {dup} appears twice; {again}")
    ids, count = _rows_it_must_hold(run_dir, name)
    have = frame["id"].to_numpy()
    if ids is not None and not np.array_equal(np.sort(have), np.sort(ids)):
        gone, extra = np.setdiff1d(ids, have), np.setdiff1d(have, ids)
        why = f"id {gone[0]} has no row" if len(gone) else f"id {extra[0]} is not one of them"
        raise LungsError(f"{path}: {len(have)} rows for the {len(ids)} images run {run} held out ({why}); the file "
                         f"is damaged: {again}")
    if count is not None and len(have) != count:
        raise LungsError(f"{path}: {len(have)} rows, but run {run} predicted {count}; the file is damaged: {again}")
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Submission validator
# --------------------------------------------------------------------------------------------------
def _read_submission(path: Path) -> pd.DataFrame:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise LungsError(f"{path} {what}; pass the submission CSV (e.g. outputs/<run_name>/submission.csv)")
    return read_text_csv(path, "one row per test image", skip_blank_lines=False)


def validate_submission(sub: pd.DataFrame | str | os.PathLike[str],
                        test_ids: Sequence[int] | np.ndarray | None = None) -> pd.DataFrame:
    """Check a submission (frame or CSV path) the way Kaggle will, before uploading it.

    Exactly the columns ``id,target_feature``; integer ids, unique and ascending; labels 0, 1 or 2;
    with ``test_ids``, exactly one row per test image. Any failure raises a one-line ``LungsError``
    naming the file and line (header = line 1; for a frame, the 0-based row). Returns the frame with
    int64 columns.
    """
    if isinstance(sub, pd.DataFrame):
        # Text, as a CSV would hold it: a float column becomes "1.0" (rejected), a missing value "".
        frame = sub.reset_index(drop=True).astype(object)
        raw = frame.where(frame.notna(), "").astype(str)
        where, fix = "submission frame", "fix the code that builds it"

        def line(i: int) -> str:
            return f"row {i}"
    else:
        path = Path(sub)
        raw = _read_submission(path)
        where, fix, line = str(path), "fix or delete that row", file_line
        # A trailing blank line is harmless; blank lines elsewhere are reported at their line.
        blank = (raw.apply(lambda c: c.str.strip()) == "").all(axis=1).to_numpy()
        end = len(raw)
        while end and blank[end - 1]:
            end -= 1
        raw = raw.iloc[:end]

    def row(i: int) -> str:
        return f"{where}: {line(i)}"

    columns = [str(c).strip() for c in raw.columns]
    expected = "'id,target_feature'"
    if set(SUBMISSION_COLUMNS) <= set(columns) and tuple(columns) != SUBMISSION_COLUMNS:
        extra = [c for c in columns if c not in SUBMISSION_COLUMNS]
        problem = f"unexpected column(s) {', '.join(extra)}" if extra else "columns in the wrong order"
        raise LungsError(f"{where}: {problem}; the header must be exactly {expected}, found "
                         f"'{','.join(columns)}'")
    table = check_labels(raw, where, line, rows="one row per test image", fix=fix)
    ids = table["id"].to_numpy()
    unsorted = np.flatnonzero(ids[1:] < ids[:-1])
    if unsorted.size:
        i = int(unsorted[0]) + 1
        raise LungsError(f"{row(i)}: id {ids[i]} comes after id {ids[i - 1]}; sort the rows by id "
                         "ascending (submission_frame does)")
    if test_ids is not None:
        expected_ids = np.unique(np.asarray(test_ids, dtype=np.int64))
        extra = ~np.isin(ids, expected_ids)
        if extra.any():
            i = int(np.flatnonzero(extra)[0])
            more = int(extra.sum()) - 1
            also = f" (and {more} more unexpected id(s))" if more else ""
            raise LungsError(f"{row(i)}: id {ids[i]}{also} is not a test image id; remove rows whose "
                             "ids are not in test_images/ (was it predicted on the right dataset?)")
        absent = expected_ids[~np.isin(expected_ids, ids)]
        if absent.size:
            more = f" (and {absent.size - 1} more)" if absent.size > 1 else ""
            raise LungsError(f"{where}: test id {absent[0]}{more} has no row; the submission needs one "
                             f"row per test image ({expected_ids.size}), predict the whole test set")
    return table
