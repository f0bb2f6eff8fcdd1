"""What a run folder holds: the names of its files, which kind of run it is, and one reader for them.

Everything that looks into a run (``lungs predict``, the audit, ensembles, the leaderboard, the report,
the explore widget, the time estimate, a classifier's ``mask_run``) reads it through :class:`RunFolder`,
so "which kind of run is this" and "where are its fold models" have one answer. Where a run folder lives
and how a run claims it is :mod:`lungs_utils.paths`; docs/design.md lists the files. Torch-free.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import LungsError
from .params import is_segmentation, load_run

PARAMS_FILE = "params.yaml"
RUN_FILE = "run.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
ENSEMBLE_FILE = "ensemble.json"
#: The run's film-polarity detector (its data's, :mod:`lungs_utils.xrays.polarity`), written when it starts.
POLARITY_FILE = "polarity.json"
KERNEL_LOG = "kernel.log"
TORCHRUN_LOG = "torchrun.log"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
BEST, LAST = "best.pt", "last.pt"
#: A lung-segmentation run's predicted masks: ``masks/test/``, ``masks/train_oof/`` and which data they
#: belong to (``masks/dataset.json``).
MASKS_DIR, TEST_MASKS, OOF_MASKS, DATASET_FILE = "masks", "test", "train_oof", "dataset.json"
#: Fold ``k`` of a cross-validation run is a complete sub-run in this folder.
FOLD_DIR = "fold_{}"
#: What a run leaves before it has produced anything (a start that crashed early): alone, these do not
#: make a folder "hold a run", so rerunning the same command simply reuses the folder.
RUN_TRACES = (PARAMS_FILE, SPLIT_FILE, POLARITY_FILE, RUN_FILE, KERNEL_LOG, TORCHRUN_LOG, LOCK_FILE)

#: The kinds of run a folder can hold.
CLASSIFIER, CV, ENSEMBLE, SEGMENTATION, OTHER = "classifier", "cv", "ensemble", "segmentation", "other"


def fold_dir(run_dir: str | os.PathLike[str], k: int) -> Path:
    """Fold ``k``'s sub-run folder of a cross-validation run."""
    return Path(run_dir) / FOLD_DIR.format(k)


def part_dirs(run_dir: str | os.PathLike[str], cv: int | None) -> list[Path]:
    """The folders that train a model: each fold's with ``cv: k``, else the run folder itself."""
    return [fold_dir(run_dir, k) for k in range(cv)] if cv else [Path(run_dir)]


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from a run's side file; ``{}`` when it is absent or not a readable object (a damaged
    side file must not hide the rest of the run: readers that need it say so themselves)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunFolder:
    """One run folder, read lazily: its params, metrics, run record, kind and the folders of its models."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def params(self) -> dict[str, Any]:
        """``params.yaml`` in today's keys; ``{}`` when absent or damaged (see :meth:`load_params`)."""
        try:
            return self.load_params()
        except LungsError:
            return {}

    def load_params(self) -> dict[str, Any]:
        """``params.yaml``, or one error line saying the folder holds no run."""
        path = self.path / PARAMS_FILE
        if not path.is_file():
            raise LungsError(f"{self.path} is not a run folder (no {PARAMS_FILE}); pass a run name under outputs/ "
                             "or a run folder")
        return load_run(path)

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / METRICS_FILE)

    @cached_property
    def info(self) -> dict[str, Any]:
        """``run.json``: status, timings, provenance (written by ``lungs run``)."""
        return read_json(self.path / RUN_FILE)

    @cached_property
    def kind(self) -> str:
        """``ensemble``, ``segmentation``, ``cv`` (a cross-validation classifier), ``classifier`` or ``other``
        (the data, leaderboard and explore notebooks' runs, or a folder that is not a run)."""
        if (self.path / ENSEMBLE_FILE).is_file() or "ensemble_method" in self.metrics:
            return ENSEMBLE
        if self.metrics.get("task") == "segmentation" or is_segmentation(self.params):
            return SEGMENTATION
        if self.params.get("cv") or self.metrics.get("cv"):
            return CV
        if "val_macro_f1" in self.metrics or (self.path / CHECKPOINTS).is_dir():
            return CLASSIFIER
        return OTHER

    @property
    def scored(self) -> bool:
        """A finished run's score is in ``metrics.json`` (macro-F1, or Dice for lung masks)."""
        return ("val_dice" if self.kind == SEGMENTATION else "val_macro_f1") in self.metrics

    @property
    def parts(self) -> list[Path]:
        """The folders holding this run's models: one per fold, else the run folder (none for an ensemble)."""
        if self.kind == ENSEMBLE:
            return []
        return part_dirs(self.path, self.params.get("cv"))

    def checkpoints(self, which: str = BEST) -> list[Path]:
        """Each part's ``checkpoints/<which>`` (present or not)."""
        return [part / CHECKPOINTS / which for part in self.parts]

    @property
    def trained(self) -> bool:
        """Every part has its best checkpoint: the run can predict."""
        found = self.checkpoints()
        return bool(found) and all(c.is_file() for c in found)

    @property
    def masks(self) -> Path:
        """A segmentation run's predicted masks folder."""
        return self.path / MASKS_DIR

    @property
    def synthetic(self) -> bool | None:
        """Whether the run was made on the phantom dataset (None when its metrics do not say)."""
        value = self.metrics.get("synthetic_data")
        return None if value is None else bool(value)
