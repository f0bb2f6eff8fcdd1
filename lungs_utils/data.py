"""The competition data: validated labels, decoded-once image arrays, splits and torch Datasets.

Layout (competition zip / Kaggle mount / phantom): ``<data_dir>/train_images/img_<id>.png``,
``test_images/img_<id>.png``, optional ``train_lung_masks/img_<id>.png`` and ``train_answers.csv``
(``id,target_feature``). Every problem is reported as one ``LungsError`` line naming the file and row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import NUM_CLASSES
from .cache import ImageArray, cached_images, probe_size
from .errors import LungsError
from .io import atomic_write_csv
from .paths import dataset_cache_dir, find_data_dir

ANSWERS = "train_answers.csv"
TRAIN_IMAGES, TEST_IMAGES, TRAIN_MASKS = "train_images", "test_images", "train_lung_masks"
PHANTOM_MARKER = "PHANTOM.md"  # same as lungs_utils.phantom.MARKER (data must not import phantom)
_IMAGE_NAME = re.compile(r"^img_(\d+)\.png$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def list_images(folder: Path) -> dict[int, Path]:
    """``{id: path}`` for every ``img_<id>.png`` in ``folder`` (other files are ignored)."""
    if not folder.is_dir():
        return {}
    found: dict[int, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _IMAGE_NAME.match(entry.name)
            if m and entry.is_file():
                image_id = int(m.group(1))
                if image_id in found:  # img_17.png and img_017.png: which one is meant?
                    raise LungsError(f"{folder}: {found[image_id].name} and {entry.name} both have id "
                                     f"{image_id}; keep one of them")
                found[image_id] = Path(entry.path)
    return dict(sorted(found.items()))


def read_answers(data_dir: Path, images: dict[int, Path] | None = None) -> pd.DataFrame:
    """Read and validate ``train_answers.csv``: columns, integer ids, labels in {0,1,2}, no duplicates,
    and (given ``images``, the ``{id: path}`` of train_images/) an image for every id.

    Returns a frame with int64 columns ``id, target_feature`` sorted by id.
    """
    path = Path(data_dir) / ANSWERS
    fix = "fix or delete that row"
    if not path.is_file():
        raise LungsError(f"{path} is missing: the labels file must sit beside train_images/ "
                         "(re-download the data or regenerate it with `lungs phantom`)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise LungsError(f"{path} is empty; it needs a header 'id,target_feature' and one row per "
                         "train image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LungsError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]}); expected "
                         "'id,target_feature' rows") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in ("id", "target_feature") if c not in raw.columns]
    if missing:
        raise LungsError(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                         f"'id,target_feature', found {','.join(raw.columns)}")
    if raw.empty:
        raise LungsError(f"{path} has a header but no rows; it needs one row per train image")
    # Row numbers are file line numbers (header = line 1), what an editor shows.
    for col, what, allowed in (("id", "id", None), ("target_feature", "label", {"0", "1", "2"})):
        values = raw[col].str.strip()
        bad_int = ~values.str.fullmatch(r"[+]?\d+")
        if bad_int.any():
            i = int(np.flatnonzero(bad_int.to_numpy())[0])
            expect = "an integer" if allowed is None else "0, 1 or 2"
            raise LungsError(f"{path}: line {i + 2}: {what} {raw[col].iloc[i]!r} is not {expect}; {fix}")
        if allowed is not None:
            bad = ~values.astype(np.int64).astype(str).isin(allowed)
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise LungsError(f"{path}: line {i + 2}: label {raw[col].iloc[i]!r} is outside "
                                 f"{{0, 1, 2}} (0 normal, 1 other disease, 2 COVID-19); {fix}")
    table = pd.DataFrame({"id": raw["id"].str.strip().astype(np.int64),
                          "target_feature": raw["target_feature"].str.strip().astype(np.int64)})
    dup = table["id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((table["id"] == table["id"].iloc[i]).to_numpy())[0])
        raise LungsError(f"{path}: line {i + 2}: id {table['id'].iloc[i]} is a duplicate of line "
                         f"{first + 2}; keep one of them")
    if images is not None:
        _check_present(table, images, Path(data_dir))
    return table.sort_values("id", kind="stable").reset_index(drop=True)


def _check_present(table: pd.DataFrame, images: dict[int, Path], data_dir: Path) -> None:
    """Every labelled id has an image (``table`` in file order, so line numbers match the CSV)."""
    folder = data_dir / TRAIN_IMAGES
    if not images:
        raise LungsError(f"{folder} holds no img_<id>.png files; re-download the data or regenerate it")
    absent = ~table["id"].isin(list(images))
    if absent.any():
        i = int(np.flatnonzero(absent.to_numpy())[0])
        image_id, more = int(table["id"].iloc[i]), int(absent.sum()) - 1
        also = f" (and {more} more)" if more else ""
        raise LungsError(f"{data_dir / ANSWERS}: line {i + 2}: id {image_id}{also} has no image "
                         f"{folder / f'img_{image_id}.png'}; restore the image(s) or remove their rows")


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

    @property
    def synthetic(self) -> bool:
        """True for the phantom dataset (``lungs phantom`` leaves a PHANTOM.md beside ``data/``)."""
        return (self.data_dir.parent / PHANTOM_MARKER).is_file()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.size


def load(data_dir: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
         workers: int | None = None, progress: bool = True) -> LungsData:
    """Find, validate and decode (once, cached) the dataset.

    All images are stored at the size of the first train image; others are resized with a warning.
    """
    root = find_data_dir(data_dir)
    train_files = list_images(root / TRAIN_IMAGES)
    labels = read_answers(root, train_files)
    size = probe_size(train_files[int(labels["id"].iloc[0])])
    test_files = list_images(root / TEST_IMAGES)
    cache = dataset_cache_dir(root, cache_dir)
    ids = labels["id"].tolist()
    train = cached_images("train", ids, [train_files[i] for i in ids], cache, size,
                          workers=workers, progress=progress)
    test = cached_images("test", list(test_files), list(test_files.values()), cache, size,
                         workers=workers, progress=progress)
    mask_files = list_images(root / TRAIN_MASKS)
    masks = None
    if mask_files and all(i in mask_files for i in ids):
        masks = cached_images("masks", ids, [mask_files[i] for i in ids], cache, size, mask=True,
                              workers=workers, progress=progress)
    return LungsData(root, labels, train, test, masks, cache)


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------
def make_split(labels: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0, folds: int | None = None,
               fold: int = 0, limit: int | None = None) -> pd.DataFrame:
    """Stratified, seeded train/validation split.

    Returns ``id, target_feature, split`` (``train``/``val``) and, with ``folds``, a ``fold`` column
    (0..k-1) where fold ``fold`` is the validation part. ``limit`` first keeps a stratified subset of
    that many rows (quick runs).
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    table = labels[["id", "target_feature"]].reset_index(drop=True)
    y = table["target_feature"].to_numpy()
    counts = np.bincount(y, minlength=NUM_CLASSES)
    if limit is not None and limit < len(table):
        keep, _ = train_test_split(np.arange(len(table)), train_size=limit, random_state=seed,
                                   stratify=y if counts[counts > 0].min() >= 2 else None)
        table = table.iloc[np.sort(keep)].reset_index(drop=True)
        y = table["target_feature"].to_numpy()
        counts = np.bincount(y, minlength=NUM_CLASSES)
    stratify = y if counts[counts > 0].min() >= 2 else None
    if folds is not None:
        if not 0 <= fold < folds:
            raise LungsError(f"params: 'fold' must be in 0..{folds - 1} when folds is {folds}, got {fold}")
        if counts[counts > 0].min() < folds:
            raise LungsError(f"folds={folds} needs at least {folds} images of every class; the smallest "
                             f"class has {counts[counts > 0].min()}: lower folds")
        assign = np.empty(len(table), dtype=np.int64)
        for k, (_, val_idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)):
            assign[val_idx] = k
        out = table.assign(fold=assign)
        out["split"] = np.where(assign == fold, "val", "train")
        return out
    n_val = max(int(round(len(table) * val_fraction)), int((counts > 0).sum()) if stratify is not None else 1)
    if n_val >= len(table):
        raise LungsError(f"cannot hold out {n_val} of {len(table)} images for validation: lower "
                         "val_fraction or add data")
    _, val_idx = train_test_split(np.arange(len(table)), test_size=n_val, random_state=seed,
                                  stratify=stratify)
    split = np.full(len(table), "train", dtype=object)
    split[val_idx] = "val"
    return table.assign(split=split)


def split_for(data: LungsData, val_fraction: float = 0.2, seed: int = 0, folds: int | None = None,
              fold: int = 0, limit: int | None = None, path: str | os.PathLike[str] | None = None
              ) -> pd.DataFrame:
    """The split for these settings, reused from CSV when present and still matching the labels.

    Saved (atomically) under the dataset's cache folder by default, or at ``path``.
    """
    if path is None:
        tag = f"seed{seed}_val{val_fraction:g}" + (f"_k{folds}" if folds else "") + \
              (f"_n{limit}" if limit else "")
        path = data.cache_dir / "splits" / f"split_{tag}.csv"
    path = Path(path)
    wanted = make_split(data.labels, val_fraction, seed, folds, fold, limit)
    if path.is_file():
        saved = pd.read_csv(path)
        if {"id", "target_feature", "split"} <= set(saved.columns) and \
                saved["id"].tolist() == wanted["id"].tolist() and \
                saved["target_feature"].tolist() == wanted["target_feature"].tolist():
            if folds is not None and "fold" in saved.columns:
                saved["split"] = np.where(saved["fold"] == fold, "val", "train")
            return saved
    atomic_write_csv(wanted, path)
    return wanted


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
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images = images
        self.masks = masks
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

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        # Sorted fancy-indexing reads a memmap sequentially; reorder back afterwards.
        order = np.argsort(idx, kind="stable")
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[idx[order]]
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
    train = XrayDataset(data.train.images, data.train.ids, labels, given, part["train"])
    val = XrayDataset(data.train.images, data.train.ids, labels,
                      val_masks if use_masks and val_masks is not None else given, part["val"])
    test = XrayDataset(data.test.images, data.test.ids, masks=test_masks if use_masks else None)
    return train, val, test
