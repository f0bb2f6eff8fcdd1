"""One classification run from params: data → split → model(s) → fit → predictions → run-folder files.

Notebooks call these steps one by one (so each can be shown and explained); ``lungs train`` and
torchrun call :func:`run` for the whole thing. The run-folder contract (docs/design.md) is filled here:
``params.yaml``, ``split.csv``, ``polarity.json``, ``history.csv``, ``checkpoints/``, ``metrics.json``,
``val_predictions.csv``, ``test_predictions.csv``, ``submission.csv``, ``audit.csv``.

A run trains its :class:`~lungs_utils.runs.parts.Part` s: the one model of a single split, or with
``cv: k`` one model per fold, each a complete sub-run in ``fold_<k>/`` (its own history, checkpoints,
TensorBoard logs and exact resume). Predicting goes predict → pool → score → write: every part predicts
its held-out images and the test set; a cross-validation run's held-out predictions are pooled into the
**out-of-fold** predictions of every train image (``oof_predictions.csv``, also ``val_predictions.csv``),
one temperature is fitted on them, and the test probabilities are the fold models' calibrated
probabilities averaged (``test_predictions.csv``, ``submission.csv``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import models, paths
from ..analysis import audit as audit_mod
from ..engine.checkpoint import load_model
from ..engine.deadline import plan, sigterm_stops_training
from ..engine.device import select_device
from ..engine.distributed import is_main_process, launched_by_torchrun
from ..engine.estimate import announce
from ..engine.loop import TrainResult
from ..engine.predict import PredictSettings, predict_proba
from ..engine.tasks import CLASSIFICATION
from ..errors import LungsError
from ..io import atomic_write_csv, atomic_write_text
from ..params import dump
from ..runfolder import (BEST, CHECKPOINTS, HISTORY_FILE, METRICS_FILE, PARAMS_FILE, POLARITY_FILE, SPLIT_FILE,
                         RunFolder)
from ..stats import calibration, decision
from ..stats.bootstrap import f1_interval
from ..stats.metrics import classification_metrics
from ..xrays import data as data_mod
from ..xrays import pseudo
from ..xrays.folds import Split, split_from_params
from ..xrays.masks import saved_masks
from ..xrays.pseudo import PseudoLabels
from ..xrays.submission import OOF_FILE, submission_frame, test_frame, val_frame, write_predictions
from . import parts as parts_mod
from . import torchrun
from .parts import CVResult, Part


@dataclass
class Experiment:
    """Everything a classification run needs, prepared from params: the data, the split, the test set and
    the parts that train (one, or one per fold of a cross-validation run)."""

    params: dict[str, Any]
    run_dir: Path
    data: data_mod.LungsData
    split: Split
    test: data_mod.XrayDataset
    parts: list[Part]
    result: TrainResult | CVResult | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)  # when the run began: its time_limit counts from here
    #: With ``pseudo_labels``: the test films added to every part's training films.
    pseudo: PseudoLabels | None = None

    @property
    def cv(self) -> int | None:
        """k of a cross-validation run, else None."""
        return self.split.k

    def _only(self, what: str) -> Any:
        if self.cv:
            raise LungsError(f"run {self.params['run_name']} is a {self.cv}-fold cross-validation: it has one {what} "
                             f"per fold; use exp.parts[k].{what} (k = 0..{self.cv - 1})")
        return getattr(self.parts[0], what)

    @property
    def model(self) -> torch.nn.Module:
        """The model of a single-split run (a cross-validation run: ``parts[k].model``)."""
        return self._only("model")

    @property
    def train(self) -> data_mod.XrayDataset:
        return self._only("train")

    @property
    def val(self) -> data_mod.XrayDataset:
        return self._only("val")


# ------------------------------------------------------------------------------------------------ prepare
def _mask_arrays(data: data_mod.LungsData, params: Mapping[str, Any], progress: bool
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """With ``masks`` set: the masks ``mask_run`` predicted for the train images (out-of-fold, for
    validation) and for the test images, so validation sees what test sees; training uses the given masks."""
    if params["masks"] == "none":
        return None, None
    if not params["mask_run"]:
        raise LungsError(f"params: masks: {params['masks']} needs mask_run: <segmentation run> for the "
                         "validation and test masks; train one with params/05_lung_segmentation.yaml")
    oof, test = saved_masks(data, params["mask_run"], progress=progress)
    return oof.images, test.images


def _datasets(data: data_mod.LungsData, rows: pd.DataFrame, params: Mapping[str, Any],
              masks: tuple[np.ndarray | None, np.ndarray | None]) -> tuple[data_mod.XrayDataset, ...]:
    use = params["masks"] != "none"
    return data_mod.datasets(data, rows, use_masks=use, val_masks=masks[0], test_masks=masks[1])


def _pseudo_films(data: data_mod.LungsData, test: data_mod.XrayDataset, params: Mapping[str, Any],
                  run_dir: Path) -> tuple[PseudoLabels | None, data_mod.XrayDataset | None]:
    """With ``pseudo_labels``: the test films that run labels confidently, as a labelled dataset (with the
    test set's lung masks when the recipe uses masks)."""
    if not params["pseudo_labels"]:
        return None, None
    found = pseudo.select(params["pseudo_labels"], data.test.ids, params["pseudo_threshold"], run_dir)
    labels = np.full(len(data.test), -1, dtype=np.int64)
    labels[found.rows] = found.labels
    return found, data_mod.XrayDataset(data.test.images, data.test.ids, labels, test.masks, found.rows,
                                       inverted=data.inverted_test)


def prepare(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """Load (and cache) the data, make the split, the test set and the parts (datasets and a model each,
    fold ``k`` seeded ``seed + k``); write ``params.yaml``, ``split.csv`` and ``polarity.json``."""
    started = time.time()
    params = dict(params)
    run_dir = paths.run_dir(params)
    # Cheap checks first: a typo must not wait for the whole dataset to be decoded.
    models.options(params["model"])
    select_device(params["device"])
    if is_main_process():
        paths.check_run_dir(params)  # never write over another run, also when run from JupyterLab
    parts_mod.check_resumable(params, run_dir)
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress, classes=True)
    split = split_from_params(data, params)
    masks = _mask_arrays(data, params, progress)
    test = _datasets(data, split.part(0), params, masks)[2]
    found, extra = _pseudo_films(data, test, params, run_dir)

    def part_datasets(rows: pd.DataFrame) -> tuple[data_mod.XrayDataset | data_mod.JoinedDataset, data_mod.XrayDataset]:
        train, val = _datasets(data, rows, params, masks)[:2]
        return (data_mod.JoinedDataset(train, extra) if extra is not None and len(extra) else train), val

    parts = parts_mod.make_parts(params, run_dir, split, part_datasets, lambda: models.for_params(params))
    if found is not None and is_main_process():
        print(found.line(), flush=True)
    if is_main_process():
        parts_mod.check_room(run_dir, parts, len(data.train) + len(data.test))
        paths.make_run_dir(params)
        dump(params, run_dir / PARAMS_FILE)
        split.write(run_dir / SPLIT_FILE)
        if data.polarity is not None:
            data.polarity.save(run_dir / POLARITY_FILE, {"train": data.train.ids[data.inverted_train],
                                                         "test": data.test.ids[data.inverted_test]})
    return Experiment(params, run_dir, data, split, test, parts, started=started, pseudo=found)


# ------------------------------------------------------------------------------------------------ train
def train(exp: Experiment, *, progress: bool = True, stop_after: int | None = None) -> TrainResult | CVResult:
    """Fit the model (history and checkpoints go to the run folder), or every fold's model of a
    cross-validation run, one after the other. With ``distributed: true`` and ``nproc_per_node`` > 1,
    outside torchrun, the training runs in that many torchrun processes and the best weights and histories
    are read back, so the notebook goes on as after a single-process run. ``stop_after`` ends this call
    after that many epochs (over all folds). With ``time_limit`` (minutes from :func:`prepare`) training
    stops at a clean point in time to predict, and so does SIGTERM (:mod:`lungs_utils.engine.deadline`)."""
    p = exp.params
    expected = announce(p, exp.data) if is_main_process() else None
    if p["distributed"] and p["nproc_per_node"] > 1 and not launched_by_torchrun():
        torchrun.launch(exp.run_dir, p["nproc_per_node"], expected.to_json() if expected else "")
        device = f"{p['nproc_per_node']} x {next(exp.parts[0].model.parameters()).device}"
        for part in exp.parts:
            part.result = parts_mod.read_back(part, device)
    else:
        with sigterm_stops_training():
            parts_mod.train_parts(exp.parts, CLASSIFICATION, progress=progress, stop_after=stop_after,
                                  deadline=plan(p, expected, exp.started))
    exp.result = parts_mod.result_of(exp.parts)
    return exp.result


# ------------------------------------------------------------------------------------ predict → pool → score → write
@dataclass
class Pooled:
    """The parts' predictions as the run's: held-out rows in id order (out-of-fold for a cross-validation
    run) with the part that held each out, and each part's test probabilities (raw softmax)."""

    val_ids: np.ndarray
    val_true: np.ndarray
    val_fold: np.ndarray
    val_raw: np.ndarray
    test_ids: np.ndarray
    test_raw: list[np.ndarray]
    seconds: float


def predict(exp: Experiment, *, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every usable part's held-out and test probabilities (the run's prediction settings, TTA included):
    ``[(val ids, val probs, test ids, test probs), ...]`` in the order of :func:`~lungs_utils.runs.parts.usable`."""
    settings = PredictSettings.from_params(exp.params)
    out = []
    for part in parts_mod.usable(exp.parts, exp.params["run_name"]):
        val_ids, val_probs = predict_proba(part.model, part.val, settings, progress=progress)
        test_ids, test_probs = predict_proba(part.model, exp.test, settings, progress=progress)
        out.append((val_ids, val_probs, test_ids, test_probs))
    return out


def pool(exp: Experiment, predicted: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
         seconds: float = 0.0) -> Pooled:
    """The parts' held-out predictions as one table in id order (a single split's already is)."""
    val_ids = np.concatenate([v for v, _, _, _ in predicted])
    order = np.argsort(val_ids, kind="stable")
    labels = pd.Series(exp.data.labels["target_feature"].to_numpy(), index=exp.data.labels["id"].to_numpy())
    val_ids = val_ids[order]
    return Pooled(val_ids=val_ids, val_true=labels.loc[val_ids].to_numpy(np.int64),
                  val_fold=exp.split.fold_of(val_ids),
                  val_raw=np.concatenate([p for _, p, _, _ in predicted])[order],
                  test_ids=predicted[0][2], test_raw=[t for _, _, _, t in predicted], seconds=seconds)


def score(exp: Experiment, pooled: Pooled) -> dict[str, Any]:
    """Calibrate (one temperature on the pooled held-out predictions; applied with ``calibrate``), average
    the parts' calibrated test probabilities, score the held-out images (macro-F1 with its 95 % bootstrap
    interval; per fold too), tune decision offsets when asked, and say it all in ``metrics.json``'s terms.
    Returns ``{"metrics", "val", "test", "oof", "fold_tests", "submission"}``."""
    p = exp.params
    y = pooled.val_true
    calibrated = None
    if len(y):
        # Measured always; applied with `calibrate` (classes, and so every F1 below, are unchanged).
        calibrated = {**calibration.summary(pooled.val_raw, y, seed=p["seed"]), "applied": p["calibrate"]}

    def calibrate(probs: np.ndarray) -> np.ndarray:
        if calibrated is None or not p["calibrate"]:
            return probs
        return calibration.apply_temperature(probs, calibrated["temperature"]).astype(np.float32)

    used = parts_mod.usable(exp.parts, p["run_name"])
    val_probs = calibrate(pooled.val_raw)
    fold_tests = [calibrate(t) for t in pooled.test_raw]
    has_test = len(pooled.test_ids) > 0
    test_probs = np.mean(fold_tests, axis=0).astype(np.float32) if has_test else pooled.test_raw[0]
    pred = val_probs.argmax(axis=1)
    scores = classification_metrics(y, pred)
    ci = f1_interval(y, pred, seed=p["seed"]) if len(y) else None
    tuned = decision.tune(val_probs, y, seed=p["seed"]) if p["tune_decision"] and len(y) else None
    summary = {
        "run_name": p["run_name"], "model": p["model"],
        "val_macro_f1": scores["macro_f1"], "val_accuracy": scores["accuracy"],
        "val_macro_f1_ci": [ci.low, ci.high] if ci else None,
        "val_set": (f"out-of-fold ({exp.cv} folds, every train image)" if exp.cv and len(used) == exp.cv else
                    f"out-of-fold ({len(used)} of {exp.cv} folds: the time ran out)" if exp.cv else "validation split"),
        "per_class": scores["per_class"], "confusion_matrix": scores["confusion_matrix"],
        "tta": p["tta"], "n_val": int(len(y)), "n_test": int(len(pooled.test_ids)),
        "image_shape": list(exp.data.image_size),
        **parts_mod.training_figures(exp.result),
        "predict_seconds": pooled.seconds,
        "synthetic_data": exp.data.synthetic,
        "decision": tuned,
        "calibration": calibrated,
        "cv": _cv_summary(used, pooled.val_fold, y, val_probs, p["seed"]) if exp.cv else None,
        "time_limit": parts_mod.time_record(exp.parts, used, p),
        "pseudo_labels": exp.pseudo.summary() if exp.pseudo is not None else None,
    }
    frame = val_frame(pooled.val_ids, y, val_probs)
    submission = None
    if tuned is not None and has_test:
        submission = submission_frame(pooled.test_ids, decision.apply_offsets(test_probs, tuned["offsets"]))
    return {"metrics": summary, "val": frame, "test": test_frame(pooled.test_ids, test_probs) if has_test else None,
            "oof": frame.assign(fold=pooled.val_fold) if exp.cv else None, "fold_tests": fold_tests,
            "submission": submission, "val_fold": pooled.val_fold}


def write(exp: Experiment, scored: Mapping[str, Any], test_ids: np.ndarray) -> None:
    """The run folder's prediction files and ``metrics.json`` (each fold's own into ``fold_<k>/``); only the
    main process writes."""
    if not is_main_process():
        return
    summary, val, fold = scored["metrics"], scored["val"], scored["val_fold"]
    if exp.cv:
        for i, part in enumerate(parts_mod.usable(exp.parts, exp.params["run_name"])):
            rows = fold == part.index
            write_predictions(part.folder, val=val[rows],
                              test=test_frame(test_ids, scored["fold_tests"][i]) if len(test_ids) else None)
            atomic_write_text(part.folder / METRICS_FILE, json.dumps(summary["cv"]["folds"][i], indent=2))
        atomic_write_csv(exp.result.history, exp.run_dir / HISTORY_FILE)
    write_predictions(exp.run_dir, val=val, test=scored["test"], submission=scored["submission"], oof=scored["oof"])
    atomic_write_text(exp.run_dir / METRICS_FILE, json.dumps(summary, indent=2))


def predict_and_save(exp: Experiment, *, progress: bool = True) -> dict[str, Any]:
    """Validation (or out-of-fold) and test probabilities, ``metrics.json`` and the submission:
    :func:`predict` → :func:`pool` → :func:`score` → :func:`write`. Returns the metrics."""
    t0 = time.perf_counter()
    predicted = predict(exp, progress=progress)
    pooled = pool(exp, predicted, seconds=time.perf_counter() - t0)
    scored = score(exp, pooled)
    write(exp, scored, pooled.test_ids)
    exp.outputs.update({"val_probs_raw": pooled.val_raw, "val_true": pooled.val_true, "metrics": scored["metrics"],
                        "val": scored["val"], "test": scored["test"], "oof": scored["oof"]})
    return scored["metrics"]


def _cv_summary(used: list[Part], val_fold: np.ndarray, y: np.ndarray, probs: np.ndarray, seed: int
                ) -> dict[str, Any]:
    """Per-fold figures of a cross-validation run (each fold's own held-out images) and their spread."""
    folds = []
    for part in used:
        rows = val_fold == part.index
        ci = f1_interval(y[rows], probs[rows].argmax(axis=1), seed=seed)
        folds.append({"fold": part.index, "n_val": int(rows.sum()), "val_macro_f1": ci.value,
                      "val_macro_f1_ci": [ci.low, ci.high],
                      "val_accuracy": float((probs[rows].argmax(axis=1) == y[rows]).mean()),
                      **parts_mod.training_figures(part.result)})
    scores = np.array([f["val_macro_f1"] for f in folds])
    seconds = [f["train_seconds"] for f in folds if f["train_seconds"] is not None]
    return {"k": len(folds), "folds": folds, "fold_mean": float(scores.mean()),
            "fold_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "fold_min": float(scores.min()), "fold_max": float(scores.max()),
            "train_seconds_per_fold": float(np.mean(seconds)) if seconds else None,
            "oof_file": OOF_FILE}


# ------------------------------------------------------------------------------------------------ audit
def audit(exp: Experiment, *, progress: bool = True) -> dict[str, Any] | None:
    """The shortcut audit of the trained model(s) (when ``params['audit']``; see
    :mod:`lungs_utils.analysis.audit`): ``metrics.json["audit"]`` and ``audit.csv`` (per held-out image: id,
    label, pred, share, area, predictions with the lungs / the rest blanked, the occlusion drop at the hot
    spot). A cross-validation run audits every train image with the fold model that never saw it."""
    p = exp.params
    if not p["audit"] or not is_main_process():
        return None
    settings = PredictSettings.from_params(p).without_tta()
    t0 = time.perf_counter()
    tables, source = [], ""
    # A reopened run (lungs audit) holds the parts it predicted with, trained elsewhere.
    used = exp.parts if all(part.result is None for part in exp.parts) else parts_mod.usable(exp.parts, p["run_name"])
    for part in used:
        table, source = audit_mod.model_figures(part.model, exp.data, part.val, p, settings, progress=progress)
        if table is None:
            break
        tables.append(table)
    if len(tables) < len(used):
        result, pooled = {"status": "skipped", "reason": source}, None
    else:
        pooled = audit_mod.pool(tables, [part.index for part in used] if exp.cv else None)
        result = audit_mod.assess(pooled, source, seed=p["seed"], seconds=time.perf_counter() - t0)
    metrics_path = exp.run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    metrics["audit"] = result
    if pooled is not None:
        atomic_write_csv(audit_mod.audit_table(pooled, result), exp.run_dir / "audit.csv")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    exp.outputs["audit"], exp.outputs["audit_table"] = result, pooled
    if "metrics" in exp.outputs:
        exp.outputs["metrics"]["audit"] = result
    return result


# ------------------------------------------------------------------------------------------------ reopen, run
def reopen(run: str | Path, *, progress: bool = True) -> Experiment:
    """A finished classifier run rebuilt from its folder — params.yaml, split.csv and the best
    checkpoint (every fold's, for a cross-validation run) — without writing anything (for ``lungs audit
    RUN``)."""
    folder = RunFolder(paths.named_run(run))
    params = folder.load_params()
    # A run whose time ran out predicted with some folds only: those are the ones it audits.
    used = (folder.metrics.get("time_limit") or {}).get("parts_used") or list(range(len(folder.parts)))
    checkpoints = folder.checkpoints()
    if folder.kind not in ("classifier", "cv") or not all(checkpoints[k].is_file() for k in used) or \
            not (folder.path / SPLIT_FILE).is_file():
        where = " in every fold_<k>/" if params["cv"] else ""
        raise LungsError(f"{folder.path} holds no trained classifier ({CHECKPOINTS}/{BEST}{where} and {SPLIT_FILE}); "
                         "the audit needs a finished classifier run")
    models.options(params["model"])
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    split = Split.read(folder.path / SPLIT_FILE)
    if not np.isin(split.table["id"].to_numpy(), data.train.ids).all():
        raise LungsError(f"{folder.path / SPLIT_FILE} names train images that {data.data_dir} does not have: the "
                         "run was made on other data; set data_dir (or LUNGS_DATA_DIR) to that data")
    device = select_device(params["device"])
    masks = _mask_arrays(data, params, progress)
    built = iter([load_model(params, c, device) if k in used else None for k, c in enumerate(checkpoints)])
    parts = parts_mod.make_parts(params, folder.path, split, lambda rows: _datasets(data, rows, params, masks)[:2],
                                 lambda: next(built))
    return Experiment(params, folder.path, data, split, _datasets(data, split.part(0), params, masks)[2],
                      [p for p in parts if p.index in used])


def run(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """The whole classification run."""
    exp = prepare(params, progress=progress)
    train(exp, progress=progress)
    predict_and_save(exp, progress=progress)
    audit(exp, progress=progress)
    return exp
