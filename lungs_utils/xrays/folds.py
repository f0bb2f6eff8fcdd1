"""How a run divides its labelled films: one stratified train/validation split, or k stratified folds.

A :class:`Split` is the one answer to "which images validate which part of a run": part ``j`` of a
cross-validation run (``cv: k``) validates on fold ``j`` and trains on the other folds; a single split has
one part, validated on its ``val`` images. Classification and lung segmentation use it alike. Its table is
the run folder's ``split.csv`` (``id, target_feature`` and ``split`` for one split, or ``fold`` for k
folds), and :func:`split_for` keeps it per dataset, so runs with the same settings share the same split
(ensembles need that). Torch-free.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import NUM_CLASSES
from ..errors import DataWarning, LungsError
from ..io import atomic_write_csv

if TYPE_CHECKING:
    from .data import LungsData


@dataclass(frozen=True)
class Split:
    """Labelled ids (``id``, ``target_feature``) and, per id, ``split`` (``train`` / ``val``) for one split
    or ``fold`` (0..k-1) for k folds."""

    table: pd.DataFrame

    def __post_init__(self) -> None:
        if ("fold" in self.table) == ("split" in self.table):
            raise ValueError("a split table has either a 'split' or a 'fold' column")

    @property
    def k(self) -> int | None:
        """The number of folds, or None for a single train/validation split."""
        return int(self.table["fold"].max()) + 1 if "fold" in self.table else None

    @property
    def parts(self) -> int:
        """How many models the split trains: k, or 1."""
        return self.k or 1

    def is_val(self, part: int = 0) -> np.ndarray:
        """Per row: whether the image validates part ``part`` (fold ``part``; the ``val`` rows of one split)."""
        if self.k is None:
            if part != 0:
                raise IndexError(f"a single split has one part, not part {part}")
            return (self.table["split"] == "val").to_numpy()
        if not 0 <= part < self.k:
            raise IndexError(f"part {part} of a {self.k}-fold split")
        return (self.table["fold"] == part).to_numpy()

    def part(self, part: int = 0) -> pd.DataFrame:
        """``id, target_feature, split`` of one part: its validation images ``val``, the rest ``train``."""
        return self.table[["id", "target_feature"]].assign(split=np.where(self.is_val(part), "val", "train"))

    def held_out_ids(self) -> np.ndarray:
        """The images a run predicts out of training: the validation images of one split, every image of a
        cross-validation run (each by the fold that held it out)."""
        ids = self.table["id"].to_numpy(np.int64)
        return ids if self.k else ids[self.is_val(0)]

    def fold_of(self, ids: np.ndarray) -> np.ndarray:
        """The part whose model never saw each of ``ids`` (0 for every validation image of a single split)."""
        where = pd.Series(self.table["fold"].to_numpy() if self.k else np.zeros(len(self.table), np.int64),
                          index=self.table["id"].to_numpy())
        return where.loc[np.asarray(ids)].to_numpy(np.int64)

    def write(self, path: str | os.PathLike[str]) -> None:
        """The run folder's ``split.csv`` (atomically)."""
        atomic_write_csv(self.table, path)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Split:
        """A run folder's ``split.csv`` (one written before folds replaced ``fold``/``folds`` keeps its
        ``split`` column: a single split)."""
        path = Path(path)
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise LungsError(f"{path} is missing or not a readable split ({type(exc).__name__}); the run folder "
                             "is damaged: rerun it") from None
        columns = ["id", "target_feature", "split" if "split" in table else "fold"]
        if not set(columns) <= set(table.columns):
            raise LungsError(f"{path}: expected columns id, target_feature and split or fold, found "
                             f"{', '.join(map(str, table.columns))}; the run folder is damaged: rerun it")
        return cls(table[columns])


def make_split(labels: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, cv: int | None = None,
               limit: int | None = None) -> Split:
    """Stratified, seeded: ``cv`` folds, or one train/validation split holding out ``val_fraction``.
    ``limit`` first keeps a stratified subset of that many rows (quick runs)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    table = labels[["id", "target_feature"]].reset_index(drop=True)
    y = table["target_feature"].to_numpy()
    counts = np.bincount(y, minlength=NUM_CLASSES)
    if limit is not None and limit < len(table):
        keep, _ = train_test_split(np.arange(len(table)), train_size=limit, random_state=seed,
                                   stratify=y if counts[counts > 0].min() >= 2 else None)
        table = table.iloc[np.sort(keep)].reset_index(drop=True)
        y = table["target_feature"].to_numpy()
        counts = np.bincount(y, minlength=NUM_CLASSES)
    if cv is not None:
        if counts[counts > 0].min() < cv:
            raise LungsError(f"cv: {cv} needs at least {cv} images of every class; the smallest class has "
                             f"{counts[counts > 0].min()}: lower cv")
        assign = np.empty(len(table), dtype=np.int64)
        for k, (_, val_idx) in enumerate(StratifiedKFold(cv, shuffle=True, random_state=seed).split(y, y)):
            assign[val_idx] = k
        return Split(table.assign(fold=assign))
    stratify = y if counts[counts > 0].min() >= 2 else None
    if stratify is None:
        small = int(np.flatnonzero((counts > 0) & (counts < 2))[0])
        warnings.warn(f"class {small} has a single image, so the validation split is not stratified: it may "
                      "hold no image of some class (and score it 0)", DataWarning, stacklevel=2)
    n_val = max(int(round(len(table) * val_fraction)), int((counts > 0).sum()) if stratify is not None else 1)
    if n_val >= len(table):
        raise LungsError(f"cannot hold out {n_val} of {len(table)} images for validation: lower "
                         "val_fraction or add data")
    _, val_idx = train_test_split(np.arange(len(table)), test_size=n_val, random_state=seed,
                                  stratify=stratify)
    split = np.full(len(table), "train", dtype=object)
    split[val_idx] = "val"
    return Split(table.assign(split=split))


def split_for(data: LungsData, val_fraction: float = 0.2, seed: int = 0, *, cv: int | None = None,
              limit: int | None = None, path: str | os.PathLike[str] | None = None) -> Split:
    """The split for these settings, reused from its CSV when present and still matching the labels.

    Saved (atomically) under the dataset's cache folder by default, or at ``path``.
    """
    if path is None:
        tag = f"seed{seed}" + (f"_k{cv}" if cv else f"_val{val_fraction:g}") + (f"_n{limit}" if limit else "")
        path = data.cache_dir / "splits" / f"split_{tag}.csv"
    path = Path(path)
    wanted = make_split(data.labels, val_fraction, seed, cv, limit)
    if path.is_file():
        try:
            saved = Split.read(path)
        except LungsError:
            saved = None  # a damaged cached split is made again
        if saved is not None and saved.k == wanted.k and \
                saved.table["id"].tolist() == wanted.table["id"].tolist() and \
                saved.table["target_feature"].tolist() == wanted.table["target_feature"].tolist():
            return saved
    wanted.write(path)
    return wanted


def split_from_params(data: LungsData, params: Mapping[str, Any]) -> Split:
    """The split a run's params ask for (``val_fraction``, ``seed``, ``cv``, ``limit``)."""
    return split_for(data, params["val_fraction"], params["seed"], cv=params["cv"], limit=params["limit"])
