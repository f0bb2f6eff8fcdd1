"""One classification run from params: data → split → model → fit → predictions → run-folder files.

Notebooks call these steps one by one (so each can be shown and explained); ``lungs train`` and
torchrun call :func:`run` for the whole thing. The run-folder contract (DESIGN.md) is filled here:
``params.yaml``, ``split.csv``, ``history.csv``, ``checkpoints/``, ``metrics.json``,
``val_predictions.csv``, ``test_predictions.csv``, ``submission.csv``.
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

from . import data as data_mod
from . import decision, models, paths, predict
from .errors import LungsError
from .io import atomic_write_csv, atomic_write_text
from .params import dump
from .train import TrainResult, autocast_dtype, check_resume, fit, is_main_process, select_device


@dataclass
class Experiment:
    """Everything a classification run needs, prepared from params."""

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


def prepare(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """Load (and cache) the data, make the split, the datasets and the model; write params + split."""
    params = dict(params)
    run_dir = paths.run_dir(params)
    # Cheap checks first: a typo must not wait for the whole dataset to be decoded.
    models.options(params["model"])
    select_device(params["device"])
    if is_main_process():
        paths.check_run_dir(params)  # never write over another run, also when run from JupyterLab
    check_resume(run_dir, params)
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress, classes=True)
    split = data_mod.split_for(data, params["val_fraction"], params["seed"], params["folds"],
                               params["fold"], params["limit"])
    train, val, test = datasets(data, split, params, progress=progress)
    torch.manual_seed(params["seed"])  # same initial weights for the same seed
    model = models.build(params["model"], in_channels=2 if params["masks"] == "channel" else 1)
    if is_main_process():
        paths.make_run_dir(params)
        dump(params, run_dir / "params.yaml")
        atomic_write_csv(split, run_dir / "split.csv")
    return Experiment(params, run_dir, data, split, train, val, test, model)


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
    """Fit the model (history and checkpoints go to the run folder)."""
    exp.result = fit(exp.model, exp.train, exp.val, exp.params, exp.run_dir, progress=progress,
                     stop_after=stop_after)
    return exp.result


def predict_and_save(exp: Experiment, *, progress: bool = True) -> dict[str, Any]:
    """Validation and test probabilities (TTA per params), metrics.json and the submission."""
    from .metrics import classification_metrics

    p = exp.params
    device = select_device(p["device"])
    kwargs = dict(image_size=p["image_size"], device=device, batch_size=max(64, p["batch_size"]),
                  tta=p["tta"], channels_last=p["channels_last"], masks=p["masks"], histeq=p["histeq"],
                  flip=p["hflip"] > 0,
                  autocast_dtype=autocast_dtype(device, p["precision"]), progress=progress)
    t0 = time.perf_counter()
    val_ids, val_probs = predict.predict_proba(exp.model, exp.val, **kwargs)
    test_ids, test_probs = predict.predict_proba(exp.model, exp.test, **kwargs)
    seconds = time.perf_counter() - t0
    val_true = exp.val.labels
    val_frame = predict.val_frame(val_ids, val_true, val_probs)
    test_frame = predict.test_frame(test_ids, test_probs) if len(test_ids) else None
    metrics = classification_metrics(val_true, val_probs.argmax(axis=1))
    tuned = decision.tune(val_probs, val_true, seed=p["seed"]) if p["tune_decision"] and len(val_ids) else None
    result = exp.result
    summary = {
        "run_name": p["run_name"], "model": p["model"],
        "val_macro_f1": metrics["macro_f1"], "val_accuracy": metrics["accuracy"],
        "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
        "tta": p["tta"], "n_val": int(len(val_ids)), "n_test": int(len(test_ids)),
        "best_epoch": result.best_epoch if result else None,
        "epochs_run": result.epochs_run if result else None,
        "stopped_early": result.stopped_early if result else None,
        # From the history: every epoch counts, also those trained before a resume.
        "train_seconds": float(result.history["train_seconds"].sum()) if result and len(result.history) else None,
        "train_images_per_s": float(result.history["images_per_s"].median()) if result and len(result.history)
        else None,
        "predict_seconds": seconds,
        "synthetic_data": exp.data.synthetic,
        "decision": tuned,
    }
    submission = None
    if tuned is not None and test_frame is not None:
        submission = predict.submission_frame(test_ids, decision.apply_offsets(test_probs, tuned["offsets"]))
    if is_main_process():
        predict.write_predictions(exp.run_dir, val=val_frame, test=test_frame, submission=submission)
        atomic_write_text(exp.run_dir / "metrics.json", json.dumps(summary, indent=2))
    exp.outputs = {"metrics": summary, "val": val_frame, "test": test_frame}
    return summary


def run(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """The whole classification run."""
    exp = prepare(params, progress=progress)
    train(exp, progress=progress)
    predict_and_save(exp, progress=progress)
    return exp

