"""One classification run from params: data → split → model → fit → predictions → run-folder files.

Notebooks call these steps one by one (so each can be shown and explained); ``lungs train`` and
torchrun call :func:`run` for the whole thing. The run-folder contract (docs/design.md) is filled here:
``params.yaml``, ``split.csv``, ``history.csv``, ``checkpoints/``, ``metrics.json``,
``val_predictions.csv``, ``test_predictions.csv``, ``submission.csv``, ``audit.csv``.

With ``cv: k`` the same steps run k-fold cross-validation inside the one run folder: every fold is a
complete sub-run in ``fold_<j>/`` (its own history, checkpoints, TensorBoard logs and exact resume), the
validation figures are the **out-of-fold** predictions of every train image (``oof_predictions.csv``,
also ``val_predictions.csv``), one temperature is fitted on them, and the test probabilities are the
fold models' calibrated probabilities averaged (``test_predictions.csv``, ``submission.csv``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import data as data_mod
from . import calibration, decision, models, paths, predict
from .bootstrap import f1_interval
from .errors import LungsError, failure_line
from .io import atomic_write_csv, atomic_write_text
from .params import dump
from .submission import OOF_FILE
from .train import (TrainResult, autocast_dtype, check_resume, fit, is_main_process, load_checkpoint, load_weights,
                    select_device)


@dataclass
class Experiment:
    """Everything a classification run needs, prepared from params.

    A cross-validation run (``cv: k``) holds one sub-experiment per fold in ``folds`` (their run folders
    are ``fold_<j>/``); its own ``model``, ``train`` and ``val`` are fold 0's, ``test`` is shared.
    """

    params: dict[str, Any]
    run_dir: Path
    data: data_mod.LungsData
    split: pd.DataFrame
    train: data_mod.XrayDataset
    val: data_mod.XrayDataset
    test: data_mod.XrayDataset
    model: torch.nn.Module
    result: TrainResult | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    folds: list[Experiment] = field(default_factory=list)

    @property
    def parts(self) -> list[Experiment]:
        """What trains: the folds of a cross-validation run, else the run itself."""
        return self.folds or [self]


FOLD_DIR = "fold_{}"


def fold_dir(run_dir: Path, k: int) -> Path:
    """Fold ``k``'s sub-run folder of a cross-validation run."""
    return run_dir / FOLD_DIR.format(k)


def _check_cv(params: Mapping[str, Any]) -> None:
    if params["cv"] and params["folds"] is not None:
        raise LungsError(f"params: cv: {params['cv']} trains every fold of its own split, and folds/fold pick one "
                         "fold of a single-split run; set folds: null (keep cv) or cv: null (keep folds)")


def prepare(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """Load (and cache) the data, make the split, the datasets and the model; write params + split.

    With ``cv: k``, the stratified k-fold split and one fold sub-experiment (datasets and a model seeded
    ``seed + j``) per fold."""
    params = dict(params)
    run_dir = paths.run_dir(params)
    # Cheap checks first: a typo must not wait for the whole dataset to be decoded.
    models.options(params["model"])
    select_device(params["device"])
    _check_cv(params)
    if is_main_process():
        paths.check_run_dir(params)  # never write over another run, also when run from JupyterLab
    cv = params["cv"]
    for folder in [fold_dir(run_dir, k) for k in range(cv)] if cv else [run_dir]:
        check_resume(folder, params)
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress, classes=True)
    split = data_mod.split_for(data, params["val_fraction"], params["seed"], cv or params["folds"],
                               params["fold"], params["limit"])
    folds: list[Experiment] = []
    for k in range(cv or 0):
        part = split.assign(split=np.where(split["fold"] == k, "val", "train"))
        train, val, test = datasets(data, part, params, progress=progress and k == 0)
        torch.manual_seed(params["seed"] + k)  # each fold model its own initial weights and batches
        folds.append(Experiment({**params, "seed": params["seed"] + k}, fold_dir(run_dir, k), data, part,
                                train, val, test, build_model(params)))
    if folds:
        train, val, test, model = folds[0].train, folds[0].val, folds[0].test, folds[0].model
    else:
        train, val, test = datasets(data, split, params, progress=progress)
        torch.manual_seed(params["seed"])  # same initial weights for the same seed
        model = build_model(params)
    if is_main_process():
        paths.make_run_dir(params)
        dump(params, run_dir / "params.yaml")
        # A cross-validation run's split gives each image's fold (the fold model that never saw it).
        atomic_write_csv(split.drop(columns=["split"]) if cv else split, run_dir / "split.csv")
        write_polarity(data, run_dir)
    return Experiment(params, run_dir, data, split, train, val, test, model, folds=folds)


def write_polarity(data: data_mod.LungsData, run_dir: Path) -> None:
    """``polarity.json``: the data's polarity detector (so ``lungs predict`` judges new films as the run's
    films were judged) and the ids of the films it turned upright."""
    if data.polarity is None:
        return
    atomic_write_text(run_dir / paths.POLARITY_FILE, json.dumps({
        "weights": [float(v) for v in data.polarity],
        "inverted_train_ids": [int(i) for i in data.train.ids[data.flipped_train]],
        "inverted_test_ids": [int(i) for i in data.test.ids[data.flipped_test]]}) + "\n")


def build_model(params: Mapping[str, Any]) -> torch.nn.Module:
    """The run's network by registry name: a second input channel when the lung mask is fed as one."""
    return models.build(params["model"], in_channels=2 if params["masks"] == "channel" else 1)


def datasets(data: data_mod.LungsData, split: pd.DataFrame, params: Mapping[str, Any], *,
             progress: bool = False) -> tuple[data_mod.XrayDataset, data_mod.XrayDataset, data_mod.XrayDataset]:
    """The run's datasets; with ``masks`` set, train carries the given lung masks and validation / test
    the masks predicted by ``mask_run`` (out-of-fold for validation), so validation sees what test sees."""
    if params["masks"] == "none":
        return data_mod.datasets(data, split)
    if not params["mask_run"]:
        raise LungsError(f"params: masks: {params['masks']} needs mask_run: <segmentation run> for the "
                         "validation and test masks; train one with params/05_lung_segmentation.yaml")
    from .segmentation import predicted_masks

    oof, test = predicted_masks(data, params["mask_run"], progress=progress)
    return data_mod.datasets(data, split, use_masks=True, val_masks=oof.images, test_masks=test.images)


def train(exp: Experiment, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Fit the model (history and checkpoints go to the run folder), or every fold's model of a
    cross-validation run, one after the other. With ``distributed: true`` and ``nproc_per_node`` > 1,
    outside torchrun, the training runs in that many torchrun processes (:func:`train_torchrun`) and
    comes back here. ``stop_after`` ends this call after that many epochs (over all folds)."""
    from .distributed import launched_by_torchrun
    from .estimate import announce

    p = exp.params
    expected = announce(p, exp.data) if is_main_process() else ""
    if p["distributed"] and p["nproc_per_node"] > 1 and not launched_by_torchrun():
        return train_torchrun(exp, p["nproc_per_node"], expected)
    if not exp.folds:
        exp.result = fit(exp.model, exp.train, exp.val, exp.params, exp.run_dir, progress=progress,
                         stop_after=stop_after)
        return exp.result
    budget = stop_after
    say = print if is_main_process() else (lambda *a, **k: None)
    spent: list[float] = []
    k_all = len(exp.folds)
    for k, fold in enumerate(exp.folds):
        name = f"{fold.run_dir.name} ({k + 1} of {k_all})"
        if budget is not None and budget <= 0:
            say(f"stopped before {name} (stop_after {stop_after}); continue the run with resume", flush=True)
            break
        say(f"{name}: {len(fold.train)} train / {len(fold.val)} validation images", flush=True)
        t0 = time.perf_counter()
        before = _epochs_done(fold) if budget is not None else 0
        fold.result = fit(fold.model, fold.train, fold.val, fold.params, fold.run_dir, progress=progress,
                          stop_after=budget)
        seconds = time.perf_counter() - t0
        if budget is not None:
            budget -= fold.result.epochs_run - before
        if not _finished(fold):
            break  # stopped inside this fold (stop_after): the next folds wait for the resume
        if fold.result.epochs_run > before:  # trained here, not only reloaded: a time per fold to go by
            spent.append(seconds)
        left = k_all - k - 1
        eta = f"; about {np.mean(spent) * left / 60:.1f} min for the {left} fold(s) left" if left and spent else ""
        say(f"{name}: best val macro-F1 {fold.result.best_metrics.get('macro_f1', float('nan')):.4f} "
            f"(epoch {fold.result.best_epoch}), {seconds / 60:.1f} min{eta}", flush=True)
    exp.result = cv_result(exp)
    return exp.result


def _finished(fold: Experiment) -> bool:
    """A fold trained to its last epoch (or stopped early by patience), not cut short by ``stop_after``."""
    r = fold.result
    return r is not None and (r.epochs_run >= fold.params["epochs"] or r.stopped_early)


def _epochs_done(fold: Experiment) -> int:
    """Epochs a fold will resume after (0 unless resuming): ``stop_after`` counts only this call's epochs."""
    last = fold.run_dir / "checkpoints" / "last.pt"
    return int(load_checkpoint(last)["epoch"]) if fold.params["resume"] and last.is_file() else 0


def cv_result(exp: Experiment) -> TrainResult:
    """One :class:`TrainResult` for the trained folds of a cross-validation run: every fold's history in
    one table (column ``fold``), the folds' mean best figures, epochs and seconds summed."""
    done = [(k, f.result) for k, f in enumerate(exp.folds) if f.result is not None]
    if not done:
        raise LungsError(f"no fold of run {exp.params['run_name']} is trained yet; call experiment.train(exp)")
    history = pd.concat([r.history.assign(fold=k) for k, r in done], ignore_index=True)
    best = {m: float(np.mean([r.best_metrics.get(m, np.nan) for _, r in done])) for m in ("macro_f1", "accuracy")}
    return TrainResult(history=history, best_metrics=best, best_epoch=0,
                       epochs_run=int(sum(r.epochs_run for _, r in done)),
                       stopped_early=any(r.stopped_early for _, r in done),
                       seconds=float(sum(r.seconds for _, r in done)),
                       train_images_per_s=float(np.median([r.train_images_per_s for _, r in done])),
                       device=done[0][1].device)


def torchrun_command(params_file: Path, nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m lungs_utils train PARAMS`` with this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lungs_utils", "train", str(params_file)]


def train_torchrun(exp: Experiment, nproc: int, expected: str = "") -> TrainResult:
    """Train ``exp`` (every fold of a cross-validation run) in ``nproc`` torchrun processes (one per GPU,
    e.g. Kaggle's "GPU T4 x2"; gloo on a CPU), from the run folder's ``params.yaml``; their log is shown
    as it comes and kept in ``torchrun.log``. The best weights and the histories are then loaded back
    into ``exp``, so the notebook goes on as after a single-process :func:`train`."""
    import lungs_utils

    from .estimate import ESTIMATE_ENV

    # The child processes must import this very package (on Kaggle: the copy unpacked by the notebook).
    root = str(Path(lungs_utils.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           # This notebook claimed the folder in prepare(): the workers write into it, clearing nothing.
           paths.CLAIMED_ENV: str(exp.run_dir.resolve()),
           ESTIMATE_ENV: expected}  # already said here: the workers repeat it rather than measure again
    cmd = torchrun_command(exp.run_dir / "params.yaml", nproc)
    print("$", " ".join(cmd[1:]), flush=True)
    log_path = exp.run_dir / "torchrun.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        # A rank's own one-line error if one printed it, else torchrun's last word.
        raise LungsError(f"torchrun with {nproc} processes failed (exit {code}): "
                         f"{failure_line(log_path)[:300]}; the whole log is in {log_path}")
    for part in exp.parts:
        part.result = _trained(part, f"{nproc} x {next(part.model.parameters()).device}")
    exp.result = cv_result(exp) if exp.folds else exp.result
    return exp.result  # type: ignore[return-value]


def _trained(part: Experiment, device: str) -> TrainResult:
    """A run (or fold) trained by another process, read back: best weights into ``part.model``, history."""
    where = next(part.model.parameters()).device
    load_weights(part.model, load_checkpoint(part.run_dir / "checkpoints" / "best.pt", map_location=where))
    history = pd.read_csv(part.run_dir / "history.csv")
    done = json.loads((part.run_dir / "metrics.json").read_text(encoding="utf-8"))
    return TrainResult(
        history=history, best_metrics={"macro_f1": done["val_macro_f1"], "accuracy": done["val_accuracy"]},
        best_epoch=done["best_epoch"], epochs_run=done["epochs_run"], stopped_early=done["stopped_early"],
        seconds=float(history["train_seconds"].sum()), train_images_per_s=float(history["images_per_s"].median()),
        device=device)


def _training_figures(result: TrainResult | None) -> dict[str, Any]:
    """What metrics.json says about the training: from the history, so epochs trained before a resume count."""
    has = result is not None and len(result.history)
    return {"best_epoch": result.best_epoch if result else None,
            "epochs_run": result.epochs_run if result else None,
            "stopped_early": result.stopped_early if result else None,
            "train_seconds": float(result.history["train_seconds"].sum()) if has else None,
            "train_images_per_s": float(result.history["images_per_s"].median()) if has else None}


def predict_and_save(exp: Experiment, *, progress: bool = True) -> dict[str, Any]:
    """Validation and test probabilities (TTA per params), metrics.json and the submission.

    A cross-validation run predicts each fold's held-out images with that fold's model (out-of-fold) and
    the test set with every fold model; the temperature is fitted on all out-of-fold predictions, and the
    test probabilities are the fold models' calibrated ones, averaged. Each fold's own files go to its
    ``fold_<j>/`` folder. Validation macro-F1 carries a 95 % bootstrap interval over the images."""
    from .metrics import classification_metrics

    p = exp.params
    device = select_device(p["device"])
    kwargs = dict(image_size=p["image_size"], device=device, batch_size=max(64, p["batch_size"]),
                  tta=p["tta"], channels_last=p["channels_last"], masks=p["masks"], histeq=p["histeq"],
                  flip=p["hflip"] > 0,
                  autocast_dtype=autocast_dtype(device, p["precision"]), progress=progress)
    untrained = [k for k, f in enumerate(exp.folds) if not _finished(f)]
    if untrained:
        raise LungsError(f"fold {untrained[0]} of run {p['run_name']} is not trained yet ({len(untrained)} of "
                         f"{len(exp.folds)} folds); continue the run with resume = True (-p resume=true)")
    t0 = time.perf_counter()
    val_parts, test_parts = [], []
    for part in exp.parts:
        val_parts.append(predict.predict_proba(part.model, part.val, **kwargs))
        test_parts.append(predict.predict_proba(part.model, exp.test, **kwargs))
    seconds = time.perf_counter() - t0
    val_ids = np.concatenate([ids for ids, _ in val_parts])
    order = np.argsort(val_ids, kind="stable")  # out-of-fold rows in id order; a single split is already
    val_ids, val_raw = val_ids[order], np.concatenate([pr for _, pr in val_parts])[order]
    val_true = np.concatenate([part.val.labels for part in exp.parts])[order]
    val_fold = np.concatenate([np.full(len(ids), k) for k, (ids, _) in enumerate(val_parts)])[order]
    test_ids = test_parts[0][0]
    calibrated = None
    if len(val_ids):
        # Measured always; applied with `calibrate` (classes, and so every F1 below, are unchanged).
        calibrated = {**calibration.summary(val_raw, val_true, seed=p["seed"]), "applied": p["calibrate"]}
    exp.outputs["val_probs_raw"], exp.outputs["val_true"] = val_raw, val_true

    def calibrate(probs: np.ndarray) -> np.ndarray:
        if calibrated is None or not p["calibrate"]:
            return probs
        return calibration.apply_temperature(probs, calibrated["temperature"]).astype(np.float32)

    val_probs = calibrate(val_raw)
    fold_test = [calibrate(pr) for _, pr in test_parts]
    test_probs = np.mean(fold_test, axis=0).astype(np.float32) if len(test_ids) else test_parts[0][1]
    val_frame = predict.val_frame(val_ids, val_true, val_probs)
    test_frame = predict.test_frame(test_ids, test_probs) if len(test_ids) else None
    metrics = classification_metrics(val_true, val_probs.argmax(axis=1))
    ci = f1_interval(val_true, val_probs.argmax(axis=1), seed=p["seed"]) if len(val_ids) else None
    tuned = decision.tune(val_probs, val_true, seed=p["seed"]) if p["tune_decision"] and len(val_ids) else None
    summary = {
        "run_name": p["run_name"], "model": p["model"],
        "val_macro_f1": metrics["macro_f1"], "val_accuracy": metrics["accuracy"],
        "val_macro_f1_ci": [ci.low, ci.high] if ci else None,
        "val_set": f"out-of-fold ({len(exp.folds)} folds, every train image)" if exp.folds else "validation split",
        "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
        "tta": p["tta"], "n_val": int(len(val_ids)), "n_test": int(len(test_ids)),
        "image_shape": list(exp.data.image_size),
        **_training_figures(exp.result),
        "predict_seconds": seconds,
        "synthetic_data": exp.data.synthetic,
        "decision": tuned,
        "calibration": calibrated,
        "cv": None,
    }
    if exp.folds:
        summary["best_epoch"] = None  # one per fold: see cv.folds
        summary["cv"] = _cv_summary(exp, val_fold, val_true, val_probs, p["seed"])
    submission = None
    if tuned is not None and test_frame is not None:
        submission = predict.submission_frame(test_ids, decision.apply_offsets(test_probs, tuned["offsets"]))
    oof = val_frame.assign(fold=val_fold) if exp.folds else None
    if is_main_process():
        for k, fold in enumerate(exp.folds):
            rows = val_fold == k
            predict.write_predictions(fold.run_dir, val=val_frame[rows],
                                      test=predict.test_frame(test_ids, fold_test[k]) if len(test_ids) else None)
            atomic_write_text(fold.run_dir / "metrics.json", json.dumps(summary["cv"]["folds"][k], indent=2))
        if exp.folds:
            atomic_write_csv(exp.result.history, exp.run_dir / "history.csv")
        predict.write_predictions(exp.run_dir, val=val_frame, test=test_frame, submission=submission, oof=oof)
        atomic_write_text(exp.run_dir / "metrics.json", json.dumps(summary, indent=2))
    exp.outputs.update({"metrics": summary, "val": val_frame, "test": test_frame, "oof": oof})
    return summary


def _cv_summary(exp: Experiment, val_fold: np.ndarray, y: np.ndarray, probs: np.ndarray, seed: int
                ) -> dict[str, Any]:
    """Per-fold figures of a cross-validation run (each fold's own held-out images) and their spread."""
    folds = []
    for k, fold in enumerate(exp.folds):
        rows = val_fold == k
        ci = f1_interval(y[rows], probs[rows].argmax(axis=1), seed=seed)
        folds.append({"fold": k, "n_val": int(rows.sum()), "val_macro_f1": ci.value,
                      "val_macro_f1_ci": [ci.low, ci.high],
                      "val_accuracy": float((probs[rows].argmax(axis=1) == y[rows]).mean()),
                      **_training_figures(fold.result)})
    scores = np.array([f["val_macro_f1"] for f in folds])
    seconds = [f["train_seconds"] for f in folds if f["train_seconds"] is not None]
    return {"k": len(folds), "folds": folds, "fold_mean": float(scores.mean()),
            "fold_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "fold_min": float(scores.min()), "fold_max": float(scores.max()),
            "train_seconds_per_fold": float(np.mean(seconds)) if seconds else None,
            "oof_file": OOF_FILE}


def audit(exp: Experiment, *, progress: bool = True) -> dict[str, Any] | None:
    """The shortcut audit of the trained model (when ``params['audit']``; see :mod:`lungs_utils.audit`):
    ``metrics.json["audit"]`` and ``audit.csv`` (per held-out image: id, label, pred, share, area,
    predictions with the lungs / the rest blanked, the occlusion drop at the hot spot). A
    cross-validation run audits every train image with the fold model that never saw it."""
    from . import audit as audit_mod

    p = exp.params
    if not p["audit"] or not is_main_process():
        return None
    device = select_device(p["device"])
    t0 = time.perf_counter()
    tables, source = [], ""
    for part in exp.parts:
        table, source = audit_mod.measure(part.model, exp.data, part.val, p, device=device,
                                          autocast_dtype=autocast_dtype(device, p["precision"]), progress=progress)
        if table is None:
            break
        tables.append(table)
    if len(tables) < len(exp.parts):
        result, pooled = {"status": "skipped", "reason": source}, None
    else:
        pooled = audit_mod.pool(tables, range(len(tables)) if exp.folds else None)
        result = audit_mod.assess(pooled, source, seed=p["seed"], seconds=time.perf_counter() - t0)
    metrics_path = exp.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    metrics["audit"] = result
    if pooled is not None:
        atomic_write_csv(audit_table(pooled, result), exp.run_dir / "audit.csv")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    exp.outputs["audit"], exp.outputs["audit_table"] = result, pooled
    if "metrics" in exp.outputs:
        exp.outputs["metrics"]["audit"] = result
    return result


def audit_table(pooled: Mapping[str, Any], result: Mapping[str, Any]) -> pd.DataFrame:
    """``audit.csv``: one row per audited image, sorted by id."""
    columns = ["id", "label", "pred", "share", "area", "pred_outside_blanked", "pred_lungs_blanked"]
    table = pd.DataFrame({k: pooled[k] for k in columns + (["fold"] if "fold" in pooled else [])})
    spot = result.get("hotspot") or {}
    if spot.get("cell") is not None:
        r, c = spot["cell"]
        table["hotspot_drop"] = np.asarray(pooled["drops"])[:, r * spot["grid"] + c]
    return table.sort_values("id", kind="stable").reset_index(drop=True)


def reopen(run: str | Path, *, progress: bool = True) -> Experiment:
    """A finished classifier run rebuilt from its folder — params.yaml, split.csv and the best
    checkpoint (every fold's, for a cross-validation run) — without writing anything (for ``lungs audit
    RUN``)."""
    folder = paths.named_run(run)
    if not (folder / "params.yaml").is_file():
        raise LungsError(f"{folder} is not a run folder (no params.yaml); pass a run name under outputs/ or a "
                         "run folder")
    from .params import load

    params = load(folder / "params.yaml")
    parts = [fold_dir(folder, k) for k in range(params["cv"])] if params["cv"] else [folder]
    checkpoints = [next((c for c in (d / "checkpoints" / "best.pt", d / "checkpoints" / "last.pt") if c.is_file()),
                        None) for d in parts]
    if None in checkpoints or not (folder / "split.csv").is_file():
        raise LungsError(f"{folder} holds no trained classifier (checkpoints/best.pt and split.csv"
                         f"{' in every fold_<k>/' if params['cv'] else ''}); the audit needs a finished classifier run")
    models.options(params["model"])
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    split = pd.read_csv(folder / "split.csv")
    if not np.isin(split["id"].to_numpy(), data.train.ids).all():
        raise LungsError(f"{folder / 'split.csv'} names train images that {data.data_dir} does not have: the run "
                         "was made on other data; set data_dir (or LUNGS_DATA_DIR) to that data")
    device = select_device(params["device"])
    rebuilt = []
    for k, (where, checkpoint) in enumerate(zip(parts, checkpoints)):
        part = split.assign(split=np.where(split["fold"] == k, "val", "train")) if params["cv"] else split
        train, val, test = datasets(data, part, params, progress=progress)
        model = build_model(params)
        load_weights(model, load_checkpoint(checkpoint), source=str(checkpoint))
        model.to(device=device, memory_format=torch.channels_last if params["channels_last"] else torch.preserve_format)
        rebuilt.append(Experiment(params, where, data, part, train, val, test, model))
    if not params["cv"]:
        return rebuilt[0]
    first = rebuilt[0]
    return Experiment(params, folder, data, split, first.train, first.val, first.test, first.model, folds=rebuilt)


def run(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """The whole classification run."""
    exp = prepare(params, progress=progress)
    train(exp, progress=progress)
    predict_and_save(exp, progress=progress)
    audit(exp, progress=progress)
    return exp
