"""Ensembles of finished runs, built from their saved predictions (no model is reloaded).

Each run folder ``outputs/<run_name>/`` contributes ``val_predictions.csv`` (id,true,predicted,p0..p2)
and ``test_predictions.csv`` (id,p0..p2). Methods:

- ``mean``: average of the members' probabilities;
- ``weighted``: greedy forward selection with replacement (Caruana et al. 2004, "Ensemble selection
  from libraries of models"): repeatedly add the member that most improves the validation macro-F1
  of the averaged probabilities; weights = how often each member was picked / picks;
- ``vote``: majority vote of the members' labels, ties broken by the mean probability.

The weights of ``weighted`` are fitted on the same validation predictions that score the ensemble, so
its reported validation F1 is optimistic; the Kaggle test score is the honest number. When every member is
a cross-validation run, their "validation" predictions are out-of-fold predictions of every train image,
so the weights are fitted on all of them (hundreds or thousands of images instead of one split's 120-240).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ..errors import LungsError
from ..io import atomic_write_text
from ..runfolder import RunFolder
from ..stats.bootstrap import f1_interval, paired_f1_difference
from ..stats.decision import stratified_halves
from ..stats.metrics import classification_metrics, macro_f1
from ..xrays.submission import (OOF_FILE, PROB_COLUMNS, TEST_FILE, VAL_FILE, read_run_table, submission_frame,
                                test_frame, val_frame, write_predictions)

METHODS: tuple[str, ...] = ("mean", "weighted", "vote")
#: Greedy selection rounds for ``weighted`` (Caruana et al. find the curve flat after a few dozen).
DEFAULT_ROUNDS = 30
OPTIMISM_NOTE = ("weights are fitted on the validation predictions that also score the ensemble, so "
                 "val_macro_f1 is optimistic")


@dataclass(frozen=True)
class Member:
    """One run's saved predictions (frames sorted by id)."""

    name: str  # the run folder's name
    val: pd.DataFrame  # id, true, predicted, p0, p1, p2
    test: pd.DataFrame  # id, p0, p1, p2
    run_dir: Path | None = None
    model: str | None = None  # from params.yaml, when present
    oof: bool = False  # a cross-validation run: ``val`` holds out-of-fold predictions of every train image


@dataclass(frozen=True)
class EnsembleResult:
    """A combined prediction and how it was made."""

    method: str
    weights: dict[str, float]  # member name -> weight (sums to 1)
    members_f1: dict[str, float]  # member name -> its own val macro-F1
    val_f1: float  # the ensemble's val macro-F1 (optimistic for ``weighted``)
    val_frame: pd.DataFrame
    test_frame: pd.DataFrame
    submission: pd.DataFrame
    val_accuracy: float = float("nan")
    #: Honest check (:func:`crossfit_gain`): does the ensemble beat its best member on images that
    #: neither its weights nor the choice of "best member" were fitted on?
    honest: dict[str, Any] | None = None
    #: Out-of-fold predictions of cross-validation runs (every train image), not one validation split.
    oof: bool = False

    @property
    def fitted_on(self) -> str:
        """On which images the weights and the verdict were fitted, in words."""
        n = len(self.val_frame)
        return (f"{n} out-of-fold predictions (every train image) of {len(self.weights)} cross-validation runs"
                if self.oof else f"{n} validation images of one split")


class Aligned(NamedTuple):
    """Members' predictions stacked on common ids (unpacks as a 5-tuple)."""

    val_ids: np.ndarray  # (N,)
    y_true: np.ndarray  # (N,)
    val_probs: np.ndarray  # (M, N, 3)
    test_ids: np.ndarray  # (T,)
    test_probs: np.ndarray  # (M, T, 3)


# --------------------------------------------------------------------------------------------------
# Loading and alignment
# --------------------------------------------------------------------------------------------------
def load_member(run_dir: str | os.PathLike[str]) -> Member:
    """Read a run folder's ``val_predictions.csv`` and ``test_predictions.csv``."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    if not run_dir.is_dir():
        raise LungsError(f"run folder {run_dir} does not exist; pass folders under outputs/ "
                         "(see `lungs leaderboard`)")
    val = read_run_table(run_dir, VAL_FILE)
    test = read_run_table(run_dir, TEST_FILE)
    oof = (run_dir / OOF_FILE).is_file()
    if oof and not np.array_equal(read_run_table(run_dir, OOF_FILE)["id"], val["id"]):
        raise LungsError(f"{run_dir / OOF_FILE} and {VAL_FILE} of run {name} hold different images; the run's "
                         "predictions are damaged: predict again (continue the run with -p resume=true)")
    return Member(name=name, val=val, test=test, run_dir=run_dir, model=_model_of(run_dir), oof=oof)


def _model_of(run_dir: Path) -> str | None:
    # Informational only: a broken params.yaml must not block ensembling.
    model = RunFolder(run_dir).params.get("model")
    return None if model is None else str(model)


def _id_difference(a: np.ndarray, b: np.ndarray) -> str:
    only = np.setxor1d(a, b)
    if only.size == 0:
        return f"{len(a)} vs {len(b)} rows"
    return f"{only.size} id(s) in only one of them, e.g. id {only[0]}"


def align(members: Sequence[Member]) -> Aligned:
    """Stack the members' probabilities; they must share val ids, true labels and test ids."""
    if not members:
        raise LungsError("no runs to ensemble; pass at least one run folder")
    cv = [m for m in members if m.oof]
    if cv and len(cv) < len(members):
        single = next(m for m in members if not m.oof)
        raise LungsError(f"run {cv[0].name} is a cross-validation run (out-of-fold predictions of all "
                         f"{len(cv[0].val)} train images) and run {single.name} a single split ({len(single.val)} "
                         "validation images): they share no validation set; ensemble cross-validation runs "
                         "together, or single-split runs made with the same split")
    ref = members[0]
    val_ids = ref.val["id"].to_numpy(np.int64)
    y_true = ref.val["true"].to_numpy(np.int64)
    test_ids = ref.test["id"].to_numpy(np.int64)
    for m in members[1:]:
        ids = m.val["id"].to_numpy(np.int64)
        if not np.array_equal(ids, val_ids):
            raise LungsError(f"run {m.name} has a different validation set from run {ref.name} "
                             f"({_id_difference(ids, val_ids)}): runs with a different seed or "
                             "val_fraction split differently; ensemble runs made with the same split")
        diff = np.flatnonzero(m.val["true"].to_numpy(np.int64) != y_true)
        if diff.size:
            raise LungsError(f"run {m.name}: true label of id {val_ids[diff[0]]} differs from run "
                             f"{ref.name} ({diff.size} id(s)); the runs used different label files")
        ids = m.test["id"].to_numpy(np.int64)
        if not np.array_equal(ids, test_ids):
            raise LungsError(f"run {m.name} predicted a different test set from run {ref.name} "
                             f"({_id_difference(ids, test_ids)}): the runs used different data; "
                             "ensemble runs on the same dataset")
    val_probs = np.stack([m.val[list(PROB_COLUMNS)].to_numpy(np.float64) for m in members])
    test_probs = np.stack([m.test[list(PROB_COLUMNS)].to_numpy(np.float64) for m in members])
    return Aligned(val_ids, y_true, val_probs, test_ids, test_probs)


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------
def _log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    p = probs[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))


def greedy_weights(val_probs: np.ndarray, y_true: np.ndarray, rounds: int = DEFAULT_ROUNDS) -> np.ndarray:
    """Caruana ensemble selection: (M,) weights summing to 1 from ``val_probs`` (M, N, 3).

    Each round adds (with replacement) the member whose inclusion gives the best val macro-F1 of the
    averaged probabilities, ties broken by lower log-loss, then lower index. The picks up to the best
    round are kept, so adding rounds never lowers the fitted score.
    """
    n_members = val_probs.shape[0]
    counts = np.zeros(n_members, dtype=np.int64)
    total = np.zeros(val_probs.shape[1:], dtype=np.float64)
    best_key: tuple[float, float] | None = None
    best_counts = counts.copy()
    for step in range(1, max(1, rounds) + 1):
        keys = []
        for m in range(n_members):
            avg = (total + val_probs[m]) / step
            keys.append((macro_f1(y_true, avg.argmax(axis=1)), -_log_loss(y_true, avg), -m))
        f1, neg_loss, neg_index = max(keys)
        counts[-neg_index] += 1
        total += val_probs[-neg_index]
        key = (f1, neg_loss)
        if best_key is None or key > best_key:
            best_key, best_counts = key, counts.copy()
    return best_counts / best_counts.sum()


def vote_probs(probs: np.ndarray) -> np.ndarray:
    """Majority vote of the members' argmax labels as (N, 3) vote shares.

    Ties go to the tied class with the highest mean probability: a small multiple of the mean
    probability is blended in, too small to reorder different vote counts but enough to make the
    argmax of the output the tie-broken winner, so downstream code can keep using argmax.
    """
    n_members = probs.shape[0]
    labels = probs.argmax(axis=2)  # (M, N)
    shares = np.stack([(labels == k).mean(axis=0) for k in range(probs.shape[2])], axis=1)
    eps = 0.01 / n_members  # vote shares differ by at least 1/M; mean probabilities by at most 1
    return (shares + eps * probs.mean(axis=0)) / (1.0 + eps)


def combined(probs: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """The members' probabilities ``(M, N, 3)`` combined as ``method`` says: vote shares, or the weighted mean."""
    return vote_probs(probs) if method == "vote" else np.tensordot(weights, probs, axes=1)


def crossfit_gain(val_probs: np.ndarray, y_true: np.ndarray, method: str, *, rounds: int = DEFAULT_ROUNDS,
                  repeats: int = 10, seed: int = 0) -> dict[str, Any]:
    """Ensemble minus best member, both chosen on one stratified half of the validation set and
    scored on the other (:func:`lungs_utils.stats.decision.stratified_halves`).

    On the full validation set a ``weighted`` ensemble is flattered by its fitted weights, and "the best
    member" by being picked on the very images it is scored on; here neither is. Returns the mean
    ``gain`` (macro-F1), its spread ``gain_std``, and the mean scores ``ensemble`` / ``best_member``.
    """
    ens, best = [], []
    for fit, score in stratified_halves(y_true, repeats, seed):
        own = [macro_f1(y_true[fit], p[fit].argmax(axis=1)) for p in val_probs]
        weights = (greedy_weights(val_probs[:, fit], y_true[fit], rounds) if method == "weighted"
                   else np.full(len(val_probs), 1.0 / len(val_probs)))
        ens.append(macro_f1(y_true[score], combined(val_probs[:, score], weights, method).argmax(axis=1)))
        best.append(macro_f1(y_true[score], val_probs[int(np.argmax(own)), score].argmax(axis=1)))
    gains = np.array(ens) - np.array(best)
    return {"gain": float(gains.mean()), "gain_std": float(gains.std()), "ensemble": float(np.mean(ens)),
            "best_member": float(np.mean(best)), "repeats": repeats}


def paired_gain(val_probs: np.ndarray, y_true: np.ndarray, ensemble_probs: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Ensemble minus its best member on all the images, with a paired bootstrap interval (the best member
    picked on the same images: a small flattery of the member, as fitted weights flatter the ensemble)."""
    own = [macro_f1(y_true, p.argmax(axis=1)) for p in val_probs]
    best = int(np.argmax(own))
    return paired_f1_difference(y_true, ensemble_probs.argmax(axis=1), val_probs[best].argmax(axis=1),
                                seed=seed).as_dict()


def combine(members: Sequence[Member], method: str = "mean", *, rounds: int = DEFAULT_ROUNDS
            ) -> EnsembleResult:
    """Combine runs' predictions with ``mean``, ``weighted`` (Caruana selection) or ``vote``.

    Note: ``weighted`` fits its weights on the validation set it is scored on, so ``val_f1`` is
    optimistic for it.
    """
    if method not in METHODS:
        raise LungsError(f"unknown ensemble method {method!r}; use one of {', '.join(METHODS)}")
    names = [m.name for m in members]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise LungsError(f"run {sorted(seen)[0]} is given more than once (or two folders share that name); "
                         "pass each run once")
    data = align(members)
    n_members = len(members)
    if method == "weighted":
        weights = greedy_weights(data.val_probs, data.y_true, rounds)
    else:
        weights = np.full(n_members, 1.0 / n_members)
    val_probs = combined(data.val_probs, weights, method)
    test_probs = combined(data.test_probs, weights, method)
    val = val_frame(data.val_ids, data.y_true, val_probs)
    members_f1 = {m.name: macro_f1(data.y_true, data.val_probs[i].argmax(axis=1))
                  for i, m in enumerate(members)}
    honest = None
    if n_members > 1:
        honest = {**crossfit_gain(data.val_probs, data.y_true, method, rounds=rounds),
                  "paired": paired_gain(data.val_probs, data.y_true, val_probs)}
    return EnsembleResult(
        method=method,
        weights={name: float(w) for name, w in zip(names, weights)},
        members_f1=members_f1,
        val_f1=macro_f1(val["true"].to_numpy(), val["predicted"].to_numpy()),
        val_frame=val,
        test_frame=test_frame(data.test_ids, test_probs),
        submission=submission_frame(data.test_ids, test_probs),
        val_accuracy=float((val["true"] == val["predicted"]).mean()),
        honest=honest,
        oof=all(m.oof for m in members),
    )


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_ensemble(result: EnsembleResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the ensemble as a run folder: predictions, submission, ``ensemble.json``, ``metrics.json``."""
    out_dir = Path(out_dir)
    written = write_predictions(out_dir, val=result.val_frame, test=result.test_frame,
                                submission=result.submission)
    summary = {
        "method": result.method,
        "weights": result.weights,
        "members_val_macro_f1": result.members_f1,
        "val_macro_f1": result.val_f1,
        "val_accuracy": result.val_accuracy,
        "note": OPTIMISM_NOTE if result.method == "weighted" else "",
        "crossfit_vs_best_member": result.honest,
        "fitted_on": result.fitted_on,
    }
    y, pred = result.val_frame["true"].to_numpy(), result.val_frame["predicted"].to_numpy()
    scored = classification_metrics(y, pred)
    ci = f1_interval(y, pred)
    metrics = {
        "val_macro_f1": result.val_f1,
        "val_macro_f1_ci": [ci.low, ci.high],
        "n_val": int(len(y)),
        "val_set": result.fitted_on,
        "oof": result.oof,  # scored on out-of-fold predictions (every train image): for the leaderboard
        "val_accuracy": result.val_accuracy,
        "val_f1_per_class": [c["f1"] for c in scored["per_class"].values()],
        "confusion_matrix": scored["confusion_matrix"],
        "ensemble_method": result.method,
        "optimistic": result.method == "weighted",
        "crossfit_gain_vs_best_member": result.honest["gain"] if result.honest else None,
    }
    for name, payload in (("ensemble.json", summary), ("metrics.json", metrics)):
        atomic_write_text(out_dir / name, _json(payload))
        written[name] = out_dir / name
    return written


def ensemble_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
                  method: str = "mean", *, rounds: int = DEFAULT_ROUNDS) -> EnsembleResult:
    """Load run folders, combine them and (given ``out_dir``) write the result there."""
    result = combine([load_member(d) for d in run_dirs], method, rounds=rounds)
    if out_dir is not None:
        write_ensemble(result, out_dir)
    return result
