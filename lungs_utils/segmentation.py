"""Lung segmentation: a mask-only U-Net trained on ``train_lung_masks``, and the predicted masks.

Training is :func:`lungs_utils.train.fit` with the :class:`Segmentation` task (Dice + BCE loss,
Dice / IoU over the whole validation set): the same loop, checkpoints, exact resume and history as
classification. A run trains one model per fold (``folds: k``) so that every train image gets an
out-of-fold mask, predicted by a model that never saw it, and averages the fold models on the test
set. Masks are written as PNGs at each image's own size into the run folder:

- ``masks/test/img_<id>.png`` for every test image,
- ``masks/train_oof/img_<id>.png`` for every train image held out by some fold,

which classifiers read through ``masks: multiply | crop | channel`` and ``mask_run`` (see
:func:`predicted_masks`): given masks for training, predicted masks for validation and test, never
the true masks at test time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import data as data_mod
from . import models, paths, presets
from .cache import ImageArray, cached_images, probe_size
from .errors import LungsError
from .inference import IDENTITY, infer
from .io import atomic_dir, atomic_write_csv, atomic_write_text
from .metrics import MaskOverlap
from .params import dump
from .paths import outputs_dir
from .predict import view_hflip
from .train import Task, TrainResult, autocast_dtype, check_resume, fit, is_main_process, select_device

NOTEBOOK = "05_lung_segmentation.ipynb"
MASKS_DIR = "masks"
#: Which images a run's masks belong to (``LungsData.fingerprint``), in ``masks/``.
DATASET_FILE = "dataset.json"
TEST_MASKS, OOF_MASKS = "test", "train_oof"
THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------ loss + task
class DiceBCELoss(nn.Module):
    """Mean over images of binary cross-entropy plus (1 - soft Dice), on mask logits.

    BCE gives every pixel a gradient from the first step; the Dice term weighs the lungs against the
    background whatever their share of the image. Per-image terms, so ``reduction="sum"`` adds up
    exactly across batches.
    """

    def __init__(self, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.smooth = bce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits, target = logits.float().flatten(1), target.float().flatten(1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dim=1)
        dice = (2 * inter + self.smooth) / (prob.sum(dim=1) + target.sum(dim=1) + self.smooth)
        per_image = self.bce_weight * bce + (1 - dice)
        return per_image.sum() if reduction == "sum" else per_image.mean()


class Segmentation(Task):
    """Lung masks: 2-channel uint8 batches (image, mask) → image input and binary mask target."""

    score = "dice"

    def make_loss(self, params: Mapping[str, Any], train_ds: torch.utils.data.Dataset) -> nn.Module:
        return DiceBCELoss()

    @staticmethod
    def _split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Resizing blurs the mask channel; the target is the binary mask at the input's size.
        return z[:, :1], (z[:, 1:2] > THRESHOLD).to(z.dtype)

    def train_inputs(self, x, y, params, generator):
        return self._split(presets.train_batch(x, params, generator, masks="channel"))

    def eval_inputs(self, x, y, params):
        return self._split(presets.to_input(x, params["image_size"], masks="channel", histeq=params["histeq"]))

    def meter(self, device: torch.device) -> MaskOverlap:
        return MaskOverlap(device)

    def update(self, meter: MaskOverlap, out: torch.Tensor, target: torch.Tensor) -> None:
        meter.update(target, out > 0)  # logit > 0 ⇔ probability > 0.5

    def metrics(self, meter: MaskOverlap) -> dict[str, Any]:
        return meter.metrics()

    def loss_sum(self, out, target, loss_fn):
        return loss_fn(out, target, reduction="sum")


SEGMENTATION = Segmentation()


def build_model(name: str) -> nn.Module:
    """A registered model with a mask head, built mask-only (forward gives mask logits)."""
    if "mask_only" not in models.options(name):
        able = [n for n in models.names() if "mask_only" in models.options(n)]
        raise LungsError(f"model {name!r} has no mask head; for segmentation use one of: {', '.join(able)}")
    return models.build(name, mask_only=True)


# ------------------------------------------------------------------------------------------------ prediction
def predict_masks(model: nn.Module, dataset: torch.utils.data.Dataset, *, image_size: int,
                  device: torch.device | str = "cpu", batch_size: int = 64, tta: bool = False,
                  channels_last: bool = False, autocast_dtype: torch.dtype | None = None,
                  histeq: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lung probabilities at ``image_size`` for every item: ``(ids (N,), float16 (N, S, S))``.

    Only the image channel of the items is used (a given mask is never an input). With ``tta`` the
    horizontally flipped view is averaged in (flipped back).
    """
    # A mirrored mask is mirrored back before it is averaged in.
    views = (IDENTITY, (view_hflip, view_hflip)) if tta else (IDENTITY,)
    ids, probs = [], []
    for p, _, batch_ids in infer(model, dataset, prepare=lambda x, y: (presets.to_input(x[:, :1], image_size,
                                                                                       histeq=histeq), y),
                                 device=device, batch_size=batch_size, views=views,
                                 transform=torch.sigmoid, channels_last=channels_last,
                                 autocast_dtype=autocast_dtype):
        probs.append(p[:, 0].to(torch.float16).cpu().numpy())
        ids.append(batch_ids.numpy().astype(np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, image_size, image_size), np.float16)
    return np.concatenate(ids), np.concatenate(probs)


def binarize(probs: np.ndarray, size: tuple[int, int], clean: bool = False) -> np.ndarray:
    """Probabilities ``(N, s, s)`` → uint8 masks ``(N, H, W)`` in {0, 255} at ``size`` (bilinear, 0.5);
    with ``clean``, post-processed by :func:`clean_masks`."""
    out = np.empty((len(probs), *size), dtype=np.uint8)
    for start in range(0, len(probs), 256):
        p = torch.from_numpy(probs[start:start + 256].astype(np.float32)).unsqueeze(1)
        if p.shape[-2:] != size:
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        out[start:start + len(p)] = ((p[:, 0] > THRESHOLD).to(torch.uint8) * 255).numpy()
    return clean_masks(out)[0] if clean else out


#: Plausible lung area, as a share of the image: outside it a cleaned mask is dropped (the given masks
#: of COVID-QU-Ex span 4.5 % for a small film in a black frame to 47 % for a film filled by the chest).
MASK_AREA = (0.02, 0.65)
#: The lungs' centre (of their bounding box) lies in this central band of the image, both ways.
MASK_CENTRE = (0.2, 0.8)
#: A second region is kept only if it has at least this share of the largest one's area.
SECOND_REGION = 0.1


def clean_mask(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Post-process one binary mask ``(H, W)``: keep the two largest connected regions (the lungs; a
    second one only if it is not a speck), fill holes; reject (empty mask) an implausible result.

    Returns ``(mask, kept)``; ``mask`` is bool. A rejected mask is empty, which classifiers read as
    "no usable mask" and use the whole image (:data:`lungs_utils.presets.MIN_MASK_AREA`), rather
    than blanking or cropping to a blob outside the chest.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    keep = [order[0] + 1] + [k + 1 for k in order[1:] if sizes[k] >= SECOND_REGION * sizes[order[0]]]
    out = np.zeros_like(mask)
    for k in keep:  # holes filled region by region: the space between the lungs is not a hole
        out |= ndimage.binary_fill_holes(labels == k)
    h, w = out.shape
    area = out.mean()
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2 / h, (cols[0] + cols[-1] + 1) / 2 / w
    plausible = (MASK_AREA[0] <= area <= MASK_AREA[1]
                 and all(MASK_CENTRE[0] <= c <= MASK_CENTRE[1] for c in (cy, cx)))
    return (out if plausible else np.zeros_like(out)), bool(plausible)


def clean_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`clean_mask` over a stack ``(N, H, W)`` of uint8 {0, 255} masks; returns the cleaned
    stack (same dtype and encoding) and the ``(N,)`` bool array of masks kept."""
    out = np.empty_like(masks)
    kept = np.empty(len(masks), dtype=bool)
    for i, m in enumerate(masks):
        cleaned, kept[i] = clean_mask(m)
        out[i] = cleaned.astype(masks.dtype) * 255
    return out, kept


def write_masks(folder: str | os.PathLike[str], ids: np.ndarray, probs: np.ndarray,
                sizes: Mapping[int, tuple[int, int]], clean: bool = False) -> Path:
    """Write ``img_<id>.png`` (0 / 255, at ``sizes[id]`` = (H, W); ``clean``: post-processed) for every
    id, as one set that replaces ``folder`` only when complete (:func:`lungs_utils.io.atomic_dir`)."""
    folder = Path(folder)
    by_size: dict[tuple[int, int], list[int]] = {}
    for row, image_id in enumerate(ids):
        by_size.setdefault(tuple(sizes[int(image_id)]), []).append(row)
    with atomic_dir(folder) as tmp:
        for size, rows in by_size.items():
            for row, mask in zip(rows, binarize(probs[rows], size, clean)):
                Image.fromarray(mask, mode="L").save(tmp / f"img_{int(ids[row])}.png")
    return folder


# ------------------------------------------------------------------------------------------------ a run
@dataclass
class SegExperiment:
    """A segmentation run: data, one split per fold, and (after training) the fold models."""

    params: dict[str, Any]
    run_dir: Path
    data: data_mod.LungsData
    splits: list[pd.DataFrame]
    models: list[nn.Module] = field(default_factory=list)
    results: list[TrainResult] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def fold_dir(self, k: int) -> Path:
        return self.run_dir / f"fold_{k}"

    def datasets(self, k: int) -> tuple[data_mod.XrayDataset, data_mod.XrayDataset]:
        """Fold ``k``'s train and validation sets: 2-channel items (image, given mask)."""
        train, val, _ = data_mod.datasets(self.data, self.splits[k], use_masks=True)
        return train, val


def prepare(params: Mapping[str, Any], *, progress: bool = True) -> SegExperiment:
    """Load the data (masks required), make the fold splits, write params.yaml and split.csv."""
    params = dict(params)
    build_model(params["model"])  # fail fast (before decoding the data) on a model without a mask head
    select_device(params["device"])
    main = is_main_process()  # under torchrun only rank 0 writes the run folder
    if main:
        paths.check_run_dir(params)  # never write over another run, also when run from JupyterLab
    data = data_mod.load(params["data_dir"], cache_dir=params["cache_dir"], progress=progress)
    if data.masks is None:
        raise LungsError(f"{data.data_dir / data_mod.TRAIN_MASKS} is missing or incomplete: segmentation "
                         "trains on the lung masks of the train images; add the masks folder")
    folds = params["folds"]
    splits = [data_mod.split_for(data, params["val_fraction"], params["seed"], folds, k, params["limit"])
              for k in range(folds or 1)]
    run_dir = paths.run_dir(params)
    if main:
        paths.make_run_dir(params)
        dump(params, run_dir / "params.yaml")
        # With folds the file gives each image's fold (its model is the one that did not train on it).
        atomic_write_csv(splits[0] if folds is None else splits[0].drop(columns=["split"]), run_dir / "split.csv")
    return SegExperiment(params, run_dir, data, splits)


def train_fold(exp: SegExperiment, k: int, *, progress: bool = True) -> TrainResult:
    """Train fold ``k``'s model (its history and checkpoints in ``fold_<k>/``)."""
    torch.manual_seed(exp.params["seed"] + k)
    model = build_model(exp.params["model"])
    train, val = exp.datasets(k)
    check_resume(exp.fold_dir(k), exp.params)
    result = fit(model, train, val, exp.params, exp.fold_dir(k), progress=progress, task=SEGMENTATION)
    while len(exp.models) <= k:
        exp.models.append(None)  # type: ignore[arg-type]
        exp.results.append(None)  # type: ignore[arg-type]
    exp.models[k], exp.results[k] = model, result
    return result


def train_folds(exp: SegExperiment, *, progress: bool = True) -> pd.DataFrame:
    """Train every fold's model; one summary row per fold (best Dice / IoU, epoch, speed)."""
    from .estimate import announce

    if is_main_process():
        announce(exp.params, exp.data)
    rows = []
    for k in range(len(exp.splits)):
        r = train_fold(exp, k, progress=progress)
        rows.append({"fold": k, "val_dice": r.best_metrics.get("dice"), "val_iou": r.best_metrics.get("iou"),
                     "best_epoch": r.best_epoch, "epochs": r.epochs_run,
                     "seconds_per_epoch": float(r.history["train_seconds"].mean()) if len(r.history) else None,
                     "images_per_s": r.train_images_per_s})
    return pd.DataFrame(rows).set_index("fold")


def history(exp: SegExperiment) -> pd.DataFrame:
    """Every fold's per-epoch history in one table (column ``fold``)."""
    frames = [r.history.assign(fold=k) for k, r in enumerate(exp.results) if r is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _sizes(folder: Path, ids: np.ndarray) -> dict[int, tuple[int, int]]:
    files = data_mod.list_images(folder)
    return {int(i): probe_size(files[int(i)]) for i in ids}


def predict_and_save(exp: SegExperiment, *, progress: bool = True) -> dict[str, Any]:
    """Out-of-fold train masks, fold-averaged test masks, their PNGs and ``metrics.json``.

    The reported Dice / IoU compare the out-of-fold masks, at the data's resolution, with the given
    masks: an honest estimate of what the test masks are worth.
    """
    p = exp.params
    device = select_device(p["device"])
    kwargs = dict(image_size=p["image_size"], device=device, batch_size=max(64, p["batch_size"]),
                  tta=p["tta"], channels_last=p["channels_last"], histeq=p["histeq"],
                  autocast_dtype=autocast_dtype(device, p["precision"]))
    t0 = time.perf_counter()
    oof_ids, oof_probs = [], []
    test_sum: np.ndarray | None = None
    test = data_mod.XrayDataset(exp.data.test.images, exp.data.test.ids, flipped=exp.data.flipped_test)
    for k, model in enumerate(exp.models):
        if model is None:
            raise LungsError(f"fold {k} of run {p['run_name']} is not trained; run train_fold(exp, {k}) first")
        _, val = exp.datasets(k)
        ids, probs = predict_masks(model, val, **kwargs)
        oof_ids.append(ids)
        oof_probs.append(probs)
        test_ids, probs = predict_masks(model, test, **kwargs)
        test_sum = probs.astype(np.float32) if test_sum is None else test_sum + probs
    oof_id = np.concatenate(oof_ids)
    order = np.argsort(oof_id)
    oof_id, oof_prob = oof_id[order], np.concatenate(oof_probs)[order]
    test_prob = (test_sum / len(exp.models)).astype(np.float16) if test_sum is not None else None
    seconds = time.perf_counter() - t0

    # Honest score: out-of-fold masks at the data's resolution against the given masks, before and
    # after post-processing (what the written masks are worth, and what the cleaning bought).
    clean = p["postprocess"]
    rows = np.searchsorted(exp.data.train.ids, oof_id)  # both sorted by id
    meter, raw_meter = MaskOverlap(), MaskOverlap()
    oof_dice = np.empty(len(rows))
    oof_kept = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), 256):
        chunk = slice(start, start + 256)
        truth = torch.from_numpy(np.asarray(exp.data.masks.images[rows[chunk]])).unsqueeze(1) > 127
        pred = binarize(oof_prob[chunk], exp.data.image_size)
        raw_meter.update(truth, torch.from_numpy(pred).unsqueeze(1) > 127)
        if clean:
            pred, oof_kept[chunk] = clean_masks(pred)
        oof_dice[chunk] = meter.update(truth, torch.from_numpy(pred).unsqueeze(1) > 127).numpy()
    oof, raw = meter.metrics(), raw_meter.metrics()

    masks_dir = exp.run_dir / MASKS_DIR
    root = exp.data.data_dir
    write_masks(masks_dir / OOF_MASKS, oof_id, oof_prob, _sizes(root / data_mod.TRAIN_IMAGES, oof_id), clean)
    test_rejected = 0
    if test_prob is not None and len(test_ids):
        write_masks(masks_dir / TEST_MASKS, test_ids, test_prob, _sizes(root / data_mod.TEST_IMAGES, test_ids),
                    clean)
        if clean:
            test_rejected = int((~clean_masks(binarize(test_prob, exp.data.image_size))[1]).sum())
    else:
        (masks_dir / TEST_MASKS).mkdir(parents=True, exist_ok=True)
    atomic_write_text(masks_dir / DATASET_FILE, json.dumps({
        "fingerprint": exp.data.fingerprint, "data_dir": str(exp.data.data_dir),
        "n_train": int(len(exp.data.train)), "n_test": int(len(exp.data.test))}, indent=2))
    results = [r for r in exp.results if r is not None]
    epochs = sum(r.epochs_run for r in results)
    train_seconds = float(sum(r.history["train_seconds"].sum() for r in results))
    summary = {
        "run_name": p["run_name"], "model": p["model"], "task": "segmentation",
        "val_dice": oof["dice"], "val_iou": oof["iou"], "val_mean_dice": oof["mean_dice"],
        "val_dice_p5": float(np.percentile(oof_dice, 5)) if len(oof_dice) else None,
        "val_dice_min": float(oof_dice.min()) if len(oof_dice) else None,
        "postprocess": clean, "raw_val_dice": raw["dice"], "raw_val_mean_dice": raw["mean_dice"],
        "oof_rejected": int((~oof_kept).sum()), "test_rejected": test_rejected,
        "n_oof": int(len(oof_id)), "n_test": int(len(test_ids)) if test_prob is not None else 0,
        "folds": [{"fold": k, "best_epoch": r.best_epoch, **{f"val_{m}": r.best_metrics.get(m)
                   for m in ("dice", "iou", "mean_dice")}} for k, r in enumerate(results)],
        "epochs_run": epochs, "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / epochs if epochs else None,
        "train_images_per_s": float(np.mean([r.train_images_per_s for r in results])) if results else None,
        "image_size": p["image_size"], "tta": p["tta"], "predict_seconds": seconds,
        "masks_dir": str(masks_dir), "synthetic_data": exp.data.synthetic,
    }
    atomic_write_csv(history(exp), exp.run_dir / "history.csv")
    atomic_write_text(exp.run_dir / "metrics.json", json.dumps(summary, indent=2))
    exp.outputs = {"metrics": summary, "oof_ids": oof_id, "oof_probs": oof_prob, "oof_dice": oof_dice,
                   "oof_kept": oof_kept,
                   "test_ids": test_ids if test_prob is not None else np.zeros(0, np.int64),
                   "test_probs": test_prob}
    return summary


def run(params: Mapping[str, Any], *, progress: bool = True) -> SegExperiment:
    """The whole segmentation run: every fold, then the masks (written by one process under torchrun)."""
    exp = prepare(params, progress=progress)
    train_folds(exp, progress=progress)
    if is_main_process():
        predict_and_save(exp, progress=progress)
    return exp


def review(exp: SegExperiment, worst: int = 6, random: int = 6) -> dict[str, np.ndarray]:
    """Out-of-fold masks to look at: the ``worst`` by Dice, then ``random`` others (seeded).

    Returns ``images``, ``predicted``, ``truth`` (uint8 at the data's size), ``ids`` and ``dice``,
    ready for :func:`lungs_utils.plots.mask_comparison`. Needs :func:`predict_and_save` first.
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


# ------------------------------------------------------------------------------------------------ using masks
def mask_run_dir(mask_run: str) -> Path:
    """The folder of a segmentation run, given its name under ``outputs/`` or a path."""
    candidates = [Path(mask_run), outputs_dir() / mask_run]
    for folder in candidates:
        if (folder / MASKS_DIR / TEST_MASKS).is_dir():
            return folder
    raise LungsError(f"mask_run {mask_run!r}: no {MASKS_DIR}/{TEST_MASKS}/ in {candidates[0]} or "
                     f"{candidates[1]}; run notebooks/05_lung_segmentation.ipynb (lungs run "
                     "params/05_lung_segmentation.yaml) first, or fix mask_run")


def masks_for(mask_run: str, images: np.ndarray, *, progress: bool = False) -> np.ndarray:
    """Lung masks (uint8 0 / 255, at the images' size) for any films ``(N, H, W)``, predicted by a finished
    segmentation run's fold models from their checkpoints: averaged and post-processed as the run's own
    test masks were (``lungs predict --mask-run``)."""
    from .params import load
    from .train import load_checkpoint, load_weights

    folder = mask_run_dir(mask_run)
    checkpoints = sorted(folder.glob("fold_*/checkpoints/best.pt"))
    if not checkpoints:
        raise LungsError(f"mask_run {mask_run!r}: no fold_<k>/checkpoints/best.pt in {folder}; finish the run first")
    p = load(folder / "params.yaml")
    device = select_device(p["device"])
    films = data_mod.XrayDataset(np.asarray(images, dtype=np.uint8), np.arange(len(images)))
    total = None
    for checkpoint in checkpoints:
        model = build_model(p["model"])
        load_weights(model, load_checkpoint(checkpoint), source=str(checkpoint))
        model.to(device=device, memory_format=torch.channels_last if p["channels_last"] else torch.preserve_format)
        _, probs = predict_masks(model, films, image_size=p["image_size"], device=device,
                                 batch_size=max(64, p["batch_size"]), tta=p["tta"], channels_last=p["channels_last"],
                                 autocast_dtype=autocast_dtype(device, p["precision"]), histeq=p["histeq"])
        total = probs.astype(np.float32) if total is None else total + probs
    return binarize((total / len(checkpoints)).astype(np.float16), tuple(images.shape[1:]), p["postprocess"])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def predicted_masks(data: data_mod.LungsData, mask_run: str, *, progress: bool = False
                    ) -> tuple[ImageArray, ImageArray]:
    """A segmentation run's predicted masks as arrays aligned with ``data``: (train out-of-fold, test).

    Both are decoded once into the dataset's cache at the data's resolution. Every test image needs a
    predicted mask; every train image needs an out-of-fold one (train the run with ``folds``).
    """
    folder = mask_run_dir(mask_run)
    made_on = _read_json(folder / MASKS_DIR / DATASET_FILE)
    if made_on and made_on.get("fingerprint") != data.fingerprint:
        raise LungsError(f"mask_run {mask_run!r} was made on other images ({made_on.get('data_dir')}, "
                         f"{made_on.get('n_train')} train / {made_on.get('n_test')} test) than these "
                         f"({data.data_dir}); its masks would belong to other films: run "
                         "05_lung_segmentation on this dataset and use that run")
    folds = (_read_yaml(folder / "params.yaml") or {}).get("folds")
    out = []
    for part, array, what in ((OOF_MASKS, data.train, "train"), (TEST_MASKS, data.test, "test")):
        files = data_mod.list_images(folder / MASKS_DIR / part)
        missing = [int(i) for i in array.ids if int(i) not in files]
        if missing:
            hint = ("rerun it with folds: 3 (or more) so every train image gets an out-of-fold mask"
                    if part == OOF_MASKS and not folds else
                    "it was made on another dataset: run 05_lung_segmentation on this one")
            raise LungsError(f"mask_run {mask_run!r} has no predicted mask for {len(missing)} of "
                             f"{len(array.ids)} {what} images (first: id {missing[0]}) in "
                             f"{folder / MASKS_DIR / part}; {hint}")
        # One cache per mask run (its path, hashed stably across processes).
        tag = f"pred-{part}-{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]}"
        out.append(cached_images(tag, array.ids, [files[int(i)] for i in array.ids], data.cache_dir,
                                 data.image_size, mask=True, progress=progress))
    return out[0], out[1]
