"""A lung-segmentation run: a mask-only U-Net trained on ``train_lung_masks``, and the masks it predicts.

Training is :func:`lungs_utils.engine.loop.fit` with the segmentation task (Dice + BCE loss, Dice / IoU
over the whole validation set): the same loop, checkpoints, exact resume and history as classification,
and the same parts (:mod:`lungs_utils.runs.parts`). With ``cv: k`` it trains one model per fold, so that
every train image gets an out-of-fold mask predicted by a model that never saw it, and averages the fold
models on the test set. Predicting goes predict → pool → score → write; masks are written as PNGs at each
image's own size into the run folder:

- ``masks/test/img_<id>.png`` for every test image,
- ``masks/train_oof/img_<id>.png`` for every train image held out by some fold,

which classifiers read through ``masks: multiply | crop | channel`` and ``mask_run``
(:func:`lungs_utils.xrays.masks.saved_masks`): given masks for training, predicted masks for validation
and test, never the true masks at test time.
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
from ..engine.deadline import plan, sigterm_stops_training
from ..engine.device import select_device
from ..engine.distributed import is_main_process
from ..engine.estimate import announce
from ..engine.predict import PredictSettings, mask_probabilities
from ..engine.tasks import SEGMENTATION
from ..errors import LungsError
from ..io import atomic_write_csv, atomic_write_text
from ..params import dump
from ..runfolder import DATASET_FILE, HISTORY_FILE, METRICS_FILE, OOF_MASKS, PARAMS_FILE, SPLIT_FILE, TEST_MASKS
from ..stats.metrics import MaskOverlap
from ..xrays import data as data_mod
from ..xrays.folds import Split, split_from_params
from ..xrays.masks import binarize, clean_masks, image_sizes, write_masks
from . import parts as parts_mod
from .parts import Part


@dataclass
class SegExperiment:
    """A segmentation run: the data (masks required), the split and its parts (one model each)."""

    params: dict[str, Any]
    run_dir: Path
    data: data_mod.LungsData
    split: Split
    parts: list[Part]
    outputs: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)  # when the run began: its time_limit counts from here


def prepare(params: Mapping[str, Any], *, progress: bool = True) -> SegExperiment:
    """Load the data (masks required), make the split and its parts (2-channel datasets: image and given
    mask; a model each, fold ``k`` seeded ``seed + k``), write params.yaml and split.csv."""
    started = time.time()
    params = dict(params)
    models.segmenter(params["model"])  # fail fast (before decoding the data) on a model without a mask head
    select_device(params["device"])
    main = is_main_process()  # under torchrun only rank 0 writes the run folder
    run_dir = paths.run_dir(params)
    if main:
        paths.check_run_dir(params)  # never write over another run, also when run from JupyterLab
    parts_mod.check_resumable(params, run_dir)
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    if data.masks is None:
        raise LungsError(f"{data.data_dir / data_mod.TRAIN_MASKS} is missing or incomplete: segmentation "
                         "trains on the lung masks of the train images; add the masks folder")
    split = split_from_params(data, params)
    parts = parts_mod.make_parts(params, run_dir, split, lambda rows: data_mod.datasets(data, rows, use_masks=True)[:2],
                                 lambda: models.segmenter(params["model"]))
    if main:
        parts_mod.check_room(run_dir, parts, len(data.train) + len(data.test), masks=True)
        paths.make_run_dir(params)
        dump(params, run_dir / PARAMS_FILE)
        split.write(run_dir / SPLIT_FILE)  # with cv: each image's fold (its mask comes from the other folds' model)
    return SegExperiment(params, run_dir, data, split, parts, started=started)


def train_folds(exp: SegExperiment, *, progress: bool = True) -> pd.DataFrame:
    """Train every part's model; one summary row per fold (best Dice / IoU, epoch, speed). With
    ``time_limit``, or on SIGTERM, training stops at a clean point (:mod:`lungs_utils.engine.deadline`)."""
    expected = announce(exp.params, exp.data) if is_main_process() else None
    with sigterm_stops_training():
        parts_mod.train_parts(exp.parts, SEGMENTATION, progress=progress,
                              deadline=plan(exp.params, expected, exp.started))
    rows = [{"fold": part.index, "val_dice": r.best_metrics.get("dice"), "val_iou": r.best_metrics.get("iou"),
             "best_epoch": r.best_epoch, "epochs": r.epochs_run,
             "seconds_per_epoch": float(r.history["train_seconds"].mean()) if len(r.history) else None,
             "images_per_s": r.train_images_per_s}
            for part in exp.parts if (r := part.result) is not None]
    return pd.DataFrame(rows).set_index("fold")


def history(exp: SegExperiment) -> pd.DataFrame:
    """Every part's per-epoch history in one table (column ``fold``)."""
    frames = [part.result.history.assign(fold=part.index) for part in exp.parts if part.result is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------ predict → pool → score → write
def predict(exp: SegExperiment) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every part's lung probabilities for its held-out images and for the test images:
    ``[(val ids, val probs, test ids, test probs), ...]``."""
    settings = PredictSettings.from_params(exp.params)
    test = data_mod.XrayDataset(exp.data.test.images, exp.data.test.ids, inverted=exp.data.inverted_test)
    out = []
    for part in parts_mod.usable(exp.parts, exp.params["run_name"]):
        out.append((*mask_probabilities(part.model, part.val, settings),
                    *mask_probabilities(part.model, test, settings)))
    return out


def pool(predicted: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities in id order, and the parts' test probabilities averaged:
    ``(oof ids, oof probs, test ids, test probs)``."""
    oof_ids = np.concatenate([v for v, _, _, _ in predicted])
    order = np.argsort(oof_ids)
    total = np.sum([t.astype(np.float32) for _, _, _, t in predicted], axis=0)
    return (oof_ids[order], np.concatenate([p for _, p, _, _ in predicted])[order], predicted[0][2],
            (total / len(predicted)).astype(np.float16))


def score(exp: SegExperiment, oof_ids: np.ndarray, oof_probs: np.ndarray) -> dict[str, Any]:
    """The honest score: out-of-fold masks at the data's resolution against the given masks, before and
    after post-processing (what the written masks are worth, and what the cleaning bought); per image
    Dice and whether the cleaned mask was kept."""
    clean = exp.params["postprocess"]
    rows = np.searchsorted(exp.data.train.ids, oof_ids)  # both sorted by id
    meter, raw_meter = MaskOverlap(), MaskOverlap()
    dice = np.empty(len(rows))
    kept = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), 256):
        chunk = slice(start, start + 256)
        truth = torch.from_numpy(np.asarray(exp.data.masks.images[rows[chunk]])).unsqueeze(1) > 127
        pred = binarize(oof_probs[chunk], exp.data.image_size)
        raw_meter.update(truth, torch.from_numpy(pred).unsqueeze(1) > 127)
        if clean:
            pred, kept[chunk] = clean_masks(pred)
        dice[chunk] = meter.update(truth, torch.from_numpy(pred).unsqueeze(1) > 127).numpy()
    return {"oof": meter.metrics(), "raw": raw_meter.metrics(), "dice": dice, "kept": kept}


def write(exp: SegExperiment, oof_ids: np.ndarray, oof_probs: np.ndarray, test_ids: np.ndarray,
          test_probs: np.ndarray) -> int:
    """The masks' PNGs (each set replacing the old one whole) and which data they belong to; returns how
    many test masks post-processing rejected."""
    clean = exp.params["postprocess"]
    masks_dir = exp.run_dir / "masks"
    root = exp.data.data_dir
    write_masks(masks_dir / OOF_MASKS, oof_ids, oof_probs, image_sizes(root / data_mod.TRAIN_IMAGES, oof_ids), clean)
    rejected = 0
    if len(test_ids):
        write_masks(masks_dir / TEST_MASKS, test_ids, test_probs, image_sizes(root / data_mod.TEST_IMAGES, test_ids),
                    clean)
        if clean:
            rejected = int((~clean_masks(binarize(test_probs, exp.data.image_size))[1]).sum())
    else:
        (masks_dir / TEST_MASKS).mkdir(parents=True, exist_ok=True)
    atomic_write_text(masks_dir / DATASET_FILE, json.dumps({
        "fingerprint": exp.data.fingerprint, "data_dir": str(exp.data.data_dir),
        "n_train": int(len(exp.data.train)), "n_test": int(len(exp.data.test))}, indent=2))
    return rejected


def predict_and_save(exp: SegExperiment, *, progress: bool = True) -> dict[str, Any]:
    """Out-of-fold train masks, fold-averaged test masks, their PNGs and ``metrics.json``:
    :func:`predict` → :func:`pool` → :func:`score` → :func:`write`. The reported Dice / IoU compare the
    out-of-fold masks, at the data's resolution, with the given masks: an honest estimate of what the test
    masks are worth."""
    p = exp.params
    t0 = time.perf_counter()
    oof_ids, oof_probs, test_ids, test_probs = pool(predict(exp))
    seconds = time.perf_counter() - t0
    scored = score(exp, oof_ids, oof_probs)
    test_rejected = write(exp, oof_ids, oof_probs, test_ids, test_probs)
    oof, raw, dice = scored["oof"], scored["raw"], scored["dice"]
    results = [part.result for part in exp.parts if part.result is not None]
    epochs = sum(r.epochs_run for r in results)
    train_seconds = float(sum(r.history["train_seconds"].sum() for r in results))
    summary = {
        "run_name": p["run_name"], "model": p["model"], "task": "segmentation",
        "val_dice": oof["dice"], "val_iou": oof["iou"], "val_mean_dice": oof["mean_dice"],
        "val_dice_p5": float(np.percentile(dice, 5)) if len(dice) else None,
        "val_dice_min": float(dice.min()) if len(dice) else None,
        "postprocess": p["postprocess"], "raw_val_dice": raw["dice"], "raw_val_mean_dice": raw["mean_dice"],
        "oof_rejected": int((~scored["kept"]).sum()), "test_rejected": test_rejected,
        "n_oof": int(len(oof_ids)), "n_test": int(len(test_ids)),
        "folds": [{"fold": k, "best_epoch": r.best_epoch, **{f"val_{m}": r.best_metrics.get(m)
                   for m in ("dice", "iou", "mean_dice")}} for k, r in enumerate(results)],
        "epochs_run": epochs, "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / epochs if epochs else None,
        "train_images_per_s": float(np.mean([r.train_images_per_s for r in results])) if results else None,
        "image_size": p["image_size"], "tta": p["tta"], "predict_seconds": seconds,
        "masks_dir": str(exp.run_dir / "masks"), "synthetic_data": exp.data.synthetic,
        "time_limit": parts_mod.time_record(exp.parts, parts_mod.usable(exp.parts, p["run_name"]), p),
    }
    atomic_write_csv(history(exp), exp.run_dir / HISTORY_FILE)
    atomic_write_text(exp.run_dir / METRICS_FILE, json.dumps(summary, indent=2))
    exp.outputs = {"metrics": summary, "oof_ids": oof_ids, "oof_probs": oof_probs, "oof_dice": dice,
                   "oof_kept": scored["kept"], "test_ids": test_ids, "test_probs": test_probs}
    return summary


def run(params: Mapping[str, Any], *, progress: bool = True) -> SegExperiment:
    """The whole segmentation run: every part, then the masks (written by one process under torchrun)."""
    exp = prepare(params, progress=progress)
    train_folds(exp, progress=progress)
    if is_main_process():
        predict_and_save(exp, progress=progress)
    return exp


# ------------------------------------------------------------------------------------------------ pictures
def review(exp: SegExperiment, worst: int = 6, random: int = 6) -> dict[str, np.ndarray]:
    """Out-of-fold masks to look at: the ``worst`` by Dice, then ``random`` others (seeded).

    Returns ``images``, ``predicted``, ``truth`` (uint8 at the data's size), ``ids`` and ``dice``,
    ready for :func:`lungs_utils.stats.plots.mask_comparison`. Needs :func:`predict_and_save` first.
    """
    ids, dice = exp.outputs["oof_ids"], exp.outputs["oof_dice"]  # per-image Dice from predict_and_save
    rng = np.random.default_rng(exp.params["seed"])
    low = np.argsort(dice, kind="stable")[:worst]
    others = np.setdiff1d(np.arange(len(ids)), low)
    pick = np.concatenate([low, rng.choice(others, size=min(random, len(others)), replace=False)])
    rows = np.searchsorted(exp.data.train.ids, ids[pick])
    return {"images": np.asarray(exp.data.train.images[rows]),
            "predicted": binarize(exp.outputs["oof_probs"][pick], exp.data.image_size, exp.params["postprocess"]),
            "truth": np.asarray(exp.data.masks.images[rows]), "ids": ids[pick], "dice": dice[pick]}


def test_preview(exp: SegExperiment, n: int = 12) -> dict[str, np.ndarray]:
    """The first ``n`` test images with their predicted masks (for a picture)."""
    ids, probs = exp.outputs["test_ids"][:n], exp.outputs["test_probs"]
    return {"images": np.asarray(exp.data.test.images[:len(ids)]),
            "predicted": binarize(probs[:len(ids)], exp.data.image_size, exp.params["postprocess"]), "ids": ids}
