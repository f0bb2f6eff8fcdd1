"""Lung masks as files and arrays: where a classifier and the audit get theirs, and how predicted mask
probabilities become clean binary masks and PNGs.

- The **given** masks (``train_lung_masks/``) are :attr:`LungsData.masks`, train images only.
- A lung-segmentation run's **saved** masks (``masks/train_oof/``: every train image's out-of-fold mask,
  ``masks/test/``) are read into arrays aligned with the data by :func:`saved_masks`: what a classifier
  with ``masks: multiply | crop | channel`` validates and predicts with (training uses the given ones).
- The audit's masks of held-out train images: given, else the mask run's out-of-fold ones
  (:func:`train_image_masks`).

Predicting masks for new films with a segmentation run's models is
:func:`lungs_utils.analysis.apply.predict_lungs`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LungsError
from ..io import atomic_dir
from ..paths import named_run
from ..runfolder import DATASET_FILE, MASKS_DIR, OOF_MASKS, TEST_MASKS, RunFolder, read_json
from .cache import ImageArray, cached_images, probe_size
from .data import LungsData
from .layout import list_images

#: Mask probabilities above this are lung.
THRESHOLD = 0.5


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
    "no usable mask" and use the whole image (:data:`lungs_utils.xrays.presets.MIN_MASK_AREA`), rather
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


def image_sizes(folder: Path, ids: np.ndarray) -> dict[int, tuple[int, int]]:
    """Each image's own size (H, W), read from its header, for the masks written at that size."""
    files = list_images(folder)
    return {int(i): probe_size(files[int(i)]) for i in ids}


def mask_run_dir(mask_run: str) -> Path:
    """The folder of a segmentation run, given its name under ``outputs/`` or a path."""
    folder = named_run(mask_run)
    if (folder / MASKS_DIR / TEST_MASKS).is_dir():
        return folder
    raise LungsError(f"mask_run {mask_run!r}: no {MASKS_DIR}/{TEST_MASKS}/ in {folder}; run "
                     "notebooks/05_lung_segmentation.ipynb (lungs run params/05_lung_segmentation.yaml) first, "
                     "or fix mask_run")


def saved_masks(data: LungsData, mask_run: str, *, progress: bool = False
                    ) -> tuple[ImageArray, ImageArray]:
    """A segmentation run's predicted masks as arrays aligned with ``data``: (train out-of-fold, test).

    Both are decoded once into the dataset's cache at the data's resolution. Every test image needs a
    predicted mask; every train image needs an out-of-fold one (train the run with ``folds``).
    """
    folder = mask_run_dir(mask_run)
    made_on = read_json(folder / MASKS_DIR / DATASET_FILE)
    if made_on and made_on.get("fingerprint") != data.fingerprint:
        raise LungsError(f"mask_run {mask_run!r} was made on other images ({made_on.get('data_dir')}, "
                         f"{made_on.get('n_train')} train / {made_on.get('n_test')} test) than these "
                         f"({data.data_dir}); its masks would belong to other films: run "
                         "05_lung_segmentation on this dataset and use that run")
    folds = RunFolder(folder).params.get("cv")
    out = []
    for part, array, what in ((OOF_MASKS, data.train, "train"), (TEST_MASKS, data.test, "test")):
        files = list_images(folder / MASKS_DIR / part)
        missing = [int(i) for i in array.ids if int(i) not in files]
        if missing:
            hint = ("rerun it with cv: 3 (or more) so every train image gets an out-of-fold mask"
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


def train_image_masks(data: LungsData, indices: np.ndarray, mask_run: str | None,
                      progress: bool = False) -> tuple[np.ndarray | None, str]:
    """Lung masks of the train images at rows ``indices`` of ``data.train`` (e.g. a run's held-out images)
    and where they come from: the given masks, else ``mask_run``'s out-of-fold masks; ``(uint8 (N, H, W) or
    None, source or the reason there are none)``."""
    if data.masks is not None:
        return np.asarray(data.masks.images[indices]), "given masks (train_lung_masks/)"
    if mask_run:
        oof, _ = saved_masks(data, mask_run, progress=progress)
        return np.asarray(oof.images[indices]), f"out-of-fold masks of mask_run {mask_run}"
    return None, ("no lung masks: the data has no train_lung_masks/ and the run has no mask_run; "
                  "train 05_lung_segmentation and pass its run as mask_run to audit this model")
