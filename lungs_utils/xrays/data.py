"""The competition data: decoded-once image arrays and torch Datasets for a split's parts.

The folder layout and the labels file are validated in :mod:`lungs_utils.xrays.layout`, splits and folds
are :mod:`lungs_utils.xrays.folds`; every problem is reported as one ``LungsError`` line naming the file
and row.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DataWarning, LungsError
from ..io import atomic_path
from ..paths import dataset_cache_dir, find_data_dir
from . import polarity
# The layout and the labels file are checked in .layout (no torch: `lungs submit` uses them); the names
# stay importable from here, and so do the splits (notebooks: data.split_for).
from .cache import ImageArray, cached_images, common_size
from .folds import Split, make_split, split_for  # noqa: F401
from .layout import (ANSWERS, PHANTOM_MARKER, TEST_IMAGES, TRAIN_IMAGES, TRAIN_MASKS,  # noqa: F401
                     check_classes, list_images, read_answers)
from .polarity import Polarity

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LungsData:
    """A validated dataset: labels plus decoded train / test (and mask) arrays aligned with them."""

    data_dir: Path
    labels: pd.DataFrame  # id, target_feature (sorted by id, aligned with ``train``)
    train: ImageArray
    test: ImageArray
    masks: ImageArray | None  # aligned with ``train`` when train_lung_masks/ is complete
    cache_dir: Path
    #: The polarity detector fitted on these train films (:mod:`lungs_utils.xrays.polarity`), and which
    #: train / test films it found intensity-inverted: those are used turned upright (see :class:`XrayDataset`).
    polarity: Polarity | None = None
    inverted_train: np.ndarray | None = None
    inverted_test: np.ndarray | None = None

    @property
    def synthetic(self) -> bool:
        """True for the phantom dataset (``lungs phantom`` leaves a PHANTOM.md beside ``data/``)."""
        return (self.data_dir.parent / PHANTOM_MARKER).is_file()

    @property
    def fingerprint(self) -> str:
        """Identifies these images (the train and test caches' keys: file names, sizes, mtimes, decoding
        rules): what a segmentation run records, so its masks are never applied to other images."""
        names = "|".join(a.path.name if a.path is not None else f"empty-{len(a)}" for a in (self.train, self.test))
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.size


def load(data_dir: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
         workers: int | None = None, progress: bool = True, classes: bool = False) -> LungsData:
    """Find, validate and decode (once, cached) the dataset.

    All images (train, test, masks) are stored at the train images' most frequent size, read from
    their headers before anything is decoded; the others are resized with a warning. Images no chest
    X-ray can be (a side under ``cache.MIN_SIDE``, over PIL's pixel limit) are one-line errors. With
    ``classes`` (a classifier is about to train) the labels are checked by :func:`check_classes` first.
    """
    root = find_data_dir(data_dir)
    train_files = list_images(root / TRAIN_IMAGES)
    labels = read_answers(root, train_files)
    if classes:
        check_classes(labels, root / ANSWERS)
    ids = labels["id"].tolist()
    train_paths = [train_files[i] for i in ids]
    # The mode, not the first image: one odd file (a 1x1 placeholder as img_0.png) must not resize the set.
    size = common_size(train_paths)
    test_files = list_images(root / TEST_IMAGES)
    cache = dataset_cache_dir(root, cache_dir)
    train = cached_images("train", ids, train_paths, cache, size,
                          workers=workers, progress=progress)
    test = cached_images("test", list(test_files), list(test_files.values()), cache, size,
                         workers=workers, progress=progress)
    mask_files = list_images(root / TRAIN_MASKS)
    masks = None
    if mask_files and all(i in mask_files for i in ids):
        masks = cached_images("masks", ids, [mask_files[i] for i in ids], cache, size, mask=True,
                              check_coverage=True, workers=workers, progress=progress)
    detector, inverted_train, inverted_test = film_polarity(train, test, cache)
    return LungsData(root, labels, train, test, masks, cache, detector, inverted_train, inverted_test)


def film_polarity(train: ImageArray, test: ImageArray, cache: Path
                  ) -> tuple[Polarity | None, np.ndarray | None, np.ndarray | None]:
    """The polarity detector of these train films and the train / test films it finds inverted, computed
    once per pair of image caches (``polarity-<keys>.npz`` beside them); one warning line when any film
    is inverted. None for a set too small to fit one (under :data:`MIN_POLARITY_FILMS` train films)."""
    if len(train) < MIN_POLARITY_FILMS or train.path is None:
        return None, None, None
    key = hashlib.sha256(f"{train.path.name}|{test.path.name if test.path else len(test)}|"
                         f"t{polarity.THUMB}c{polarity.C}p{polarity.PASSES}".encode()).hexdigest()[:16]
    path = cache / f"polarity-{key}.npz"
    try:
        with np.load(path) as saved:
            detector, inverted_train, inverted_test = Polarity(saved["weights"]), saved["train"], saved["test"]
    except (OSError, ValueError, KeyError):
        thumbs = polarity.thumbnails(train.images)  # once: the fit and the train films' verdicts share them
        detector = Polarity.from_films(thumbs)
        inverted_train, inverted_test = detector.inverted(train.images, thumbs), detector.inverted(test.images)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, weights=detector.weights, train=inverted_train, test=inverted_test)
        for stale in cache.glob("polarity-*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
    if inverted_train.any() or inverted_test.any():
        first = (train.ids[inverted_train] if inverted_train.any() else test.ids[inverted_test])[0]
        warnings.warn(f"{int(inverted_train.sum())} of {len(train)} train and {int(inverted_test.sum())} of "
                      f"{len(test)} test film(s) look intensity-inverted (lungs bright, bones dark), e.g. "
                      f"img_{first}.png: they are used turned upright (lungs_utils/xrays/polarity.py)",
                      DataWarning, stacklevel=3)
    return detector, inverted_train, inverted_test


#: Fewer train films than this and no polarity detector is fitted (all films are taken as they are).
MIN_POLARITY_FILMS = 20


# --------------------------------------------------------------------------------------------------
# torch Dataset
# --------------------------------------------------------------------------------------------------
class XrayDataset(torch.utils.data.Dataset):
    """Items ``(image uint8 (C,H,W), label, id)`` read from a decoded array (memmap-friendly).

    ``C`` is 1, or 2 when ``masks`` are given (image, lung mask). Unlabelled sets (test) return
    label ``-1``. ``transform`` (e.g. a torchvision v2 transform) is applied per item when given;
    the training loop normally augments whole batches instead, which is much cheaper.
    """

    def __init__(self, images: np.ndarray, ids: Sequence[int], labels: Sequence[int] | None = None,
                 masks: np.ndarray | None = None, indices: Sequence[int] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 inverted: np.ndarray | None = None) -> None:
        self.images = images
        self.masks = masks
        #: Per row of ``images``: an intensity-inverted film, read turned upright (None: none is).
        self.inverted = inverted if inverted is not None and inverted.any() else None
        self.all_ids = np.asarray(ids, dtype=np.int64)
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.all_labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform
        if masks is not None and masks.shape != images.shape:
            raise LungsError(f"lung masks have shape {masks.shape[1:]} but images {images.shape[1:]}; "
                             "rebuild the mask cache (masks must match image size)")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def ids(self) -> np.ndarray:
        return self.all_ids[self.indices]

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.all_labels is None else self.all_labels[self.indices]

    def films(self, idx: np.ndarray) -> np.ndarray:
        """The films of rows ``idx`` of ``images`` as uint8 ``(N, H, W)``, inverted ones turned upright."""
        # Sorted fancy-indexing reads a memmap sequentially; reorder back afterwards.
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[idx[order]]
        if self.inverted is not None:
            turn = self.inverted[idx]
            batch[turn] = 255 - batch[turn]
        return batch

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        order = np.argsort(idx, kind="stable")
        batch = self.films(idx)
        x = torch.from_numpy(batch).unsqueeze(1)
        if self.masks is not None:
            m = np.empty_like(batch)
            m[order] = self.masks[idx[order]]
            x = torch.cat([x, torch.from_numpy(m).unsqueeze(1)], dim=1)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        row = int(self.indices[i])
        x = self._rows(np.asarray([row]))[0]
        if self.transform is not None:
            x = self.transform(x)
        label = -1 if self.all_labels is None else int(self.all_labels[row])
        return x, label, int(self.all_ids[row])

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """Batched read used by DataLoader: one array read per batch instead of one per image."""
        if self.transform is not None:
            return [self[i] for i in items]
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        x = self._rows(rows)
        labels = [-1] * len(rows) if self.all_labels is None else self.all_labels[rows].tolist()
        return list(zip(x.unbind(0), labels, self.all_ids[rows].tolist()))


class JoinedDataset(torch.utils.data.Dataset):
    """Two labelled datasets read as one, ``first``'s items then ``second``'s: a training part with the
    pseudo-labelled test films (:mod:`lungs_utils.xrays.pseudo`) added, without copying either's films."""

    def __init__(self, first: XrayDataset, second: XrayDataset) -> None:
        if (first.masks is None) != (second.masks is None):
            raise LungsError("joined datasets must both carry lung masks or both not")
        self.first, self.second = first, second
        self.masks = first.masks  # what callers check: whether items carry a mask channel

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([self.first.ids, self.second.ids])

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([self.first.labels, self.second.labels])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """One batched read from each side, in the order asked."""
        items = np.asarray(items, dtype=np.int64)
        n = len(self.first)
        mine = items < n
        out: list[Any] = [None] * len(items)
        for side, where, offset in ((self.first, np.flatnonzero(mine), 0), (self.second, np.flatnonzero(~mine), n)):
            if len(where):
                for slot, item in zip(where, side.__getitems__((items[where] - offset).tolist())):
                    out[slot] = item
        return out


def datasets(data: LungsData, split: pd.DataFrame, *, use_masks: bool = False,
             val_masks: np.ndarray | None = None, test_masks: np.ndarray | None = None
             ) -> tuple[XrayDataset, XrayDataset, XrayDataset]:
    """Train, validation and test datasets for a split (lung masks as a second channel if asked).

    With ``use_masks`` the train part carries the given masks; the validation part carries
    ``val_masks`` (aligned with ``data.train``, e.g. out-of-fold predictions) or else the given ones,
    and the test part carries ``test_masks`` (aligned with ``data.test``) when given.
    """
    if use_masks and data.masks is None:
        raise LungsError(f"{data.data_dir / TRAIN_MASKS} is missing or incomplete: lung masks are needed "
                         "for this setting; use masks: none or add the masks")
    position = pd.Series(np.arange(len(data.labels)), index=data.labels["id"].to_numpy())
    labels = data.labels["target_feature"].to_numpy()
    given = data.masks.images if use_masks and data.masks is not None else None
    part = {name: position.loc[split.loc[split["split"] == name, "id"].to_numpy()].to_numpy()
            for name in ("train", "val")}
    train = XrayDataset(data.train.images, data.train.ids, labels, given, part["train"], inverted=data.inverted_train)
    val = XrayDataset(data.train.images, data.train.ids, labels,
                      val_masks if use_masks and val_masks is not None else given, part["val"],
                      inverted=data.inverted_train)
    test = XrayDataset(data.test.images, data.test.ids, masks=test_masks if use_masks else None,
                       inverted=data.inverted_test)
    return train, val, test
