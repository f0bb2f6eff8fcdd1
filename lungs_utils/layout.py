"""The competition layout and its labels file, validated without decoding an image (and without torch).

Layout (competition zip / Kaggle mount / phantom): ``<data_dir>/train_images/img_<id>.png``,
``test_images/img_<id>.png``, optional ``train_lung_masks/img_<id>.png`` and ``train_answers.csv``
(``id,target_feature``). Every problem is reported as one ``LungsError`` line naming the file and row.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import CLASS_NAMES, NUM_CLASSES
from .errors import DataWarning, LungsError

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


def read_text_csv(path: Path, rows: str, **kwargs: object) -> pd.DataFrame:
    """Read an ``id,target_feature`` CSV as strings, turning pandas' failures into one-line errors.

    ``rows`` says what the file holds besides the header (used in the message for an empty file).
    """
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise LungsError(f"{path} is empty; it needs a header 'id,target_feature' and {rows}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LungsError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]}); expected "
                         "'id,target_feature' rows") from None


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
    raw = read_text_csv(path, "one row per train image")
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


def check_classes(labels: pd.DataFrame, source: Path) -> None:
    """What a classifier needs of its labels: at least two classes (else one line and no run); a missing
    class or one of a single image is a warning, since the run would quietly never predict it."""
    counts = np.bincount(labels["target_feature"].to_numpy(), minlength=NUM_CLASSES)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        c = int(present[0]) if len(present) else 0
        raise LungsError(f"{source}: every train image has label {c} ({CLASS_NAMES[c]}); a classifier needs "
                         "images of at least two classes: check the labels file")
    for c in np.flatnonzero(counts < 2):
        what = "no train image" if counts[c] == 0 else "only 1 train image"
        warnings.warn(f"{source}: class {c} ({CLASS_NAMES[c]}) has {what}: the model can hardly ever predict "
                      "it, and macro-F1 weighs it like the others; add images of it if you can",
                      DataWarning, stacklevel=2)
