"""The competition layout and its labels file, validated without decoding an image (and without torch).

Layout (competition zip / Kaggle mount / phantom): ``<data_dir>/train_images/img_<id>.png``,
``test_images/img_<id>.png``, optional ``train_lung_masks/img_<id>.png`` and ``train_answers.csv``
(``id,target_feature``). Every problem is reported as one ``LungsError`` line naming the file and row.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CLASS_NAMES, NUM_CLASSES
from ..errors import DataWarning, LungsError

ANSWERS = "train_answers.csv"
TRAIN_IMAGES, TEST_IMAGES, TRAIN_MASKS = "train_images", "test_images", "train_lung_masks"
PHANTOM_MARKER = "PHANTOM.md"  # same as lungs_utils.xrays.phantom.MARKER (data must not import phantom)
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


def check_labels(raw: pd.DataFrame, where: str, line: Callable[[int], str], *, key: str = "id",
                 rows: str = "one row per image", fix: str = "fix or delete that row") -> pd.DataFrame:
    """The one check of an answers table (``id,target_feature``, or ``file,target_feature`` with
    ``key="file"``) read as text: both columns present, at least one row, ids non-negative integers,
    labels 0, 1 or 2, no id twice. Every problem is one ``LungsError`` naming ``where`` and ``line(row)``.

    Returns ``key, target_feature`` (int64 ids, or the file names stripped) in the table's order. Train
    labels, submissions and answer keys, and ``lungs predict --answers`` all come through here; each adds
    its own checks (images present, rows sorted, one row per test image, films matched).
    """
    raw = raw.copy()
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in (key, "target_feature") if c not in raw.columns]
    if missing:
        raise LungsError(f"{where}: missing column(s) {', '.join(missing)}; expected header "
                         f"'{key},target_feature', found '{','.join(raw.columns)}'")
    if raw.empty:
        raise LungsError(f"{where} has a header but no rows; it needs {rows}")
    columns = [("target_feature", "label")] if key != "id" else [("id", "id"), ("target_feature", "label")]
    for col, what in columns:
        values = raw[col].astype(str).str.strip()
        bad = ~values.str.fullmatch(r"\+?\d+")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            value = values.iloc[i]
            if value.lower() in ("", "nan", "none", "<na>"):
                problem = f"{what} is empty"
            else:
                problem = f"{what} {value!r} is " + ("not a non-negative integer" if col == "id" else "not 0, 1 or 2")
            raise LungsError(f"{where}: {line(i)}: {problem}; {fix}")
    labels = raw["target_feature"].astype(str).str.strip().astype(np.int64)
    outside = ~labels.isin(range(NUM_CLASSES))
    if outside.any():
        i = int(np.flatnonzero(outside.to_numpy())[0])
        raise LungsError(f"{where}: {line(i)}: label {raw['target_feature'].iloc[i].strip()!r} is outside {{0, 1, 2}} "
                         f"(0 normal, 1 other disease, 2 COVID-19); {fix}")
    keys = raw[key].astype(str).str.strip()
    table = pd.DataFrame({key: keys.astype(np.int64) if key == "id" else keys, "target_feature": labels})
    dup = table[key].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((table[key] == table[key].iloc[i]).to_numpy())[0])
        raise LungsError(f"{where}: {line(i)}: {key} {table[key].iloc[i]} is a duplicate of {line(first)}; "
                         "keep one of them")
    return table


def file_line(row: int) -> str:
    """A table row as the line an editor shows for it (the header is line 1)."""
    return f"line {row + 2}"


def read_answers(data_dir: Path, images: dict[int, Path] | None = None) -> pd.DataFrame:
    """Read and validate ``train_answers.csv`` (:func:`check_labels`) and (given ``images``, the
    ``{id: path}`` of train_images/) that every id has an image.

    Returns a frame with int64 columns ``id, target_feature`` sorted by id.
    """
    path = Path(data_dir) / ANSWERS
    if not path.is_file():
        raise LungsError(f"{path} is missing: the labels file must sit beside train_images/ "
                         "(re-download the data or regenerate it with `lungs phantom`)")
    rows = "one row per train image"
    table = check_labels(read_text_csv(path, rows), str(path), file_line, rows=rows)
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
