"""One classification run from params: data → split → model → fit → predictions → run-folder files.

Notebooks call these steps one by one (so each can be shown and explained); ``lungs train`` and
torchrun call :func:`run` for the whole thing. The run-folder contract (docs/design.md) is filled here:
``params.yaml``, ``split.csv``, ``history.csv``, ``checkpoints/``, ``metrics.json``,
``val_predictions.csv``, ``test_predictions.csv``, ``submission.csv``, ``audit.csv``.
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
from .errors import LungsError, failure_line
from .io import atomic_write_csv, atomic_write_text
from .params import dump
from .train import (TrainResult, autocast_dtype, check_resume, fit, is_main_process, load_checkpoint, load_weights,
                    select_device)


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
    model = build_model(params)
    if is_main_process():
        paths.make_run_dir(params)
        dump(params, run_dir / "params.yaml")
        atomic_write_csv(split, run_dir / "split.csv")
    return Experiment(params, run_dir, data, split, train, val, test, model)


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
    """Fit the model (history and checkpoints go to the run folder). With ``distributed: true`` and
    ``nproc_per_node`` > 1, outside torchrun, the training runs in that many torchrun processes
    (:func:`train_torchrun`) and comes back here."""
    from .distributed import launched_by_torchrun

    p = exp.params
    if p["distributed"] and p["nproc_per_node"] > 1 and not launched_by_torchrun():
        return train_torchrun(exp, p["nproc_per_node"])
    exp.result = fit(exp.model, exp.train, exp.val, exp.params, exp.run_dir, progress=progress,
                     stop_after=stop_after)
    return exp.result


def torchrun_command(params_file: Path, nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m lungs_utils train PARAMS`` with this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lungs_utils", "train", str(params_file)]


def train_torchrun(exp: Experiment, nproc: int) -> TrainResult:
    """Train ``exp`` in ``nproc`` torchrun processes (one per GPU, e.g. Kaggle's "GPU T4 x2"; gloo on a
    CPU), from the run folder's ``params.yaml``; their log is shown as it comes and kept in
    ``torchrun.log``. The best weights and the history are then loaded back into ``exp``, so the
    notebook goes on as after a single-process :func:`train`."""
    import lungs_utils

    # The child processes must import this very package (on Kaggle: the copy unpacked by the notebook).
    root = str(Path(lungs_utils.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           # This notebook claimed the folder in prepare(): the workers write into it, clearing nothing.
           paths.CLAIMED_ENV: str(exp.run_dir.resolve())}
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
    device = next(exp.model.parameters()).device
    load_weights(exp.model, load_checkpoint(exp.run_dir / "checkpoints" / "best.pt", map_location=device))
    history = pd.read_csv(exp.run_dir / "history.csv")
    done = json.loads((exp.run_dir / "metrics.json").read_text(encoding="utf-8"))
    exp.result = TrainResult(
        history=history, best_metrics={"macro_f1": done["val_macro_f1"], "accuracy": done["val_accuracy"]},
        best_epoch=done["best_epoch"], epochs_run=done["epochs_run"], stopped_early=done["stopped_early"],
        seconds=float(history["train_seconds"].sum()), train_images_per_s=float(history["images_per_s"].median()),
        device=f"{nproc} x {device}")
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
    calibrated = None
    if len(val_ids):
        # Measured always; applied with `calibrate` (classes, and so every F1 below, are unchanged).
        calibrated = {**calibration.summary(val_probs, val_true, seed=p["seed"]), "applied": p["calibrate"]}
        exp.outputs["val_probs_raw"] = val_probs
        if p["calibrate"]:
            val_probs = calibration.apply_temperature(val_probs, calibrated["temperature"]).astype(np.float32)
            if len(test_ids):
                test_probs = calibration.apply_temperature(test_probs, calibrated["temperature"]).astype(np.float32)
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
        "calibration": calibrated,
    }
    submission = None
    if tuned is not None and test_frame is not None:
        submission = predict.submission_frame(test_ids, decision.apply_offsets(test_probs, tuned["offsets"]))
    if is_main_process():
        predict.write_predictions(exp.run_dir, val=val_frame, test=test_frame, submission=submission)
        atomic_write_text(exp.run_dir / "metrics.json", json.dumps(summary, indent=2))
    exp.outputs.update({"metrics": summary, "val": val_frame, "test": test_frame})
    return summary


def audit(exp: Experiment, *, progress: bool = True) -> dict[str, Any] | None:
    """The shortcut audit of the trained model (when ``params['audit']``; see :mod:`lungs_utils.audit`):
    ``metrics.json["audit"]`` and ``audit.csv`` (per validation image: id, label, pred, share, area)."""
    from . import audit as audit_mod

    p = exp.params
    if not p["audit"] or not is_main_process():
        return None
    device = select_device(p["device"])
    result, table = audit_mod.run(exp.model, exp.data, exp.val, p, device=device,
                                  autocast_dtype=autocast_dtype(device, p["precision"]), progress=progress)
    metrics_path = exp.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    metrics["audit"] = result
    if table is not None:
        atomic_write_csv(pd.DataFrame({k: table[k] for k in ("id", "label", "pred", "share", "area")}),
                         exp.run_dir / "audit.csv")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    exp.outputs["audit"], exp.outputs["audit_table"] = result, table
    if "metrics" in exp.outputs:
        exp.outputs["metrics"]["audit"] = result
    return result


def reopen(run: str | Path, *, progress: bool = True) -> Experiment:
    """A finished classifier run rebuilt from its folder — params.yaml, split.csv and the best
    checkpoint — without writing anything (for ``lungs audit RUN``)."""
    folder = paths.named_run(run)
    if not (folder / "params.yaml").is_file():
        raise LungsError(f"{folder} is not a run folder (no params.yaml); pass a run name under outputs/ or a "
                         "run folder")
    checkpoint = next((c for c in (folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt")
                       if c.is_file()), None)
    if checkpoint is None or not (folder / "split.csv").is_file():
        raise LungsError(f"{folder} holds no trained classifier (checkpoints/best.pt and split.csv); the audit "
                         "needs a finished classifier run")
    from .params import load

    params = load(folder / "params.yaml")
    models.options(params["model"])
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    split = pd.read_csv(folder / "split.csv")
    if not np.isin(split["id"].to_numpy(), data.train.ids).all():
        raise LungsError(f"{folder / 'split.csv'} names train images that {data.data_dir} does not have: the run "
                         "was made on other data; set data_dir (or LUNGS_DATA_DIR) to that data")
    train, val, test = datasets(data, split, params, progress=progress)
    model = build_model(params)
    load_weights(model, load_checkpoint(checkpoint), source=str(checkpoint))
    model.to(device=select_device(params["device"]),
             memory_format=torch.channels_last if params["channels_last"] else torch.preserve_format)
    return Experiment(params, folder, data, split, train, val, test, model)


def run(params: Mapping[str, Any], *, progress: bool = True) -> Experiment:
    """The whole classification run."""
    exp = prepare(params, progress=progress)
    train(exp, progress=progress)
    predict_and_save(exp, progress=progress)
    audit(exp, progress=progress)
    return exp

