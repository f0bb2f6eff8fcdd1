"""Decode once: PNGs become one uint8 ``(N, H, W)`` array on disk, memory-mapped on every later use.

The cache file name carries a fingerprint of the file list, sizes, mtimes and target size, so any change
to the images makes a new cache (and the stale one is removed). Files are written under a temporary name
and renamed, so a killed build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataWarning, LungsError
from .io import atomic_path

CACHE_VERSION = 1  # bump when the decoding rules change, so old caches are rebuilt


@dataclass(frozen=True)
class ImageArray:
    """Decoded images (``(N, H, W)`` uint8, usually a read-only memmap) and their integer ids."""

    images: np.ndarray
    ids: np.ndarray
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def decode(path: Path, size: tuple[int, int] | None = None, *, mask: bool = False) -> tuple[np.ndarray, str]:
    """Decode one image to 8-bit grayscale ``(H, W)``; returns it and a fix-up note ('' if none).

    RGB/RGBA/palette images are converted to luminance and 16-bit images scaled to 8 bits — both
    deliberate, reported through the note — and images of another size are resized (bilinear for
    images, nearest for masks). Anything PIL cannot decode raises a one-line ``LungsError``.
    """
    try:
        with Image.open(path) as im:
            im.load()
            note = []
            if im.format not in (None, "PNG"):
                note.append(f"{im.format} content")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
                note.append("16-bit scaled to 8-bit")
            elif im.mode != "L":
                note.append(f"{im.mode} converted to grayscale")
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    # Flatten transparency onto black, as a viewer of a radiograph would see it.
                    im = im.convert("RGBA")
                    background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                    im = Image.alpha_composite(background, im)
                im = im.convert("L")
            if size is not None and im.size != (size[1], size[0]):
                note.append(f"{im.size[0]}x{im.size[1]} resized to {size[1]}x{size[0]}")
                im = im.resize((size[1], size[0]), Image.NEAREST if mask else Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise LungsError(f"{path}: image file is missing; re-download the data or remove its row") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LungsError(f"{path}: cannot decode image ({type(exc).__name__}: {exc}); "
                         "re-download it or remove its row from train_answers.csv") from None
    if mask:
        arr = np.where(arr > 127, 255, 0).astype(np.uint8)
    return arr, ", ".join(note)


def probe_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image without decoding its pixels."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise LungsError(f"{path}: image file is missing; re-download the data or remove its row") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise LungsError(f"{path}: cannot decode image ({exc}); re-download it or remove its row") from None


def fingerprint(paths: Sequence[Path], size: tuple[int, int], kind: str) -> str:
    """Hash of names, byte sizes and mtimes: changes whenever any image is added, removed or rewritten."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{kind}|{size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + (16 << 20):
        raise LungsError(f"not enough disk space for the image cache in {folder}: need "
                         f"{needed / 2**20:.0f} MB, {free / 2**20:.0f} MB free; free space or set "
                         "cache_dir (or env LUNGS_CACHE_DIR) to a larger disk")


def cached_images(name: str, ids: Sequence[int], paths: Sequence[Path], cache_dir: Path,
                  size: tuple[int, int] | None = None, *, mask: bool = False,
                  workers: int | None = None, progress: bool = True) -> ImageArray:
    """Decode ``paths`` once into ``cache_dir/<name>-<fingerprint>.npy`` and return it memory-mapped.

    ``size`` (H, W) defaults to the size of the first image; others are resized with a warning.
    """
    if len(paths) != len(ids):
        raise ValueError("ids and paths differ in length")
    paths = [Path(p) for p in paths]
    ids_arr = np.asarray(ids, dtype=np.int64)
    if len(paths) == 0:
        h, w = size or (0, 0)
        return ImageArray(np.zeros((0, h, w), np.uint8), ids_arr)
    if size is None:
        size = probe_size(paths[0])
    kind = "mask" if mask else "image"
    key = fingerprint(paths, size, kind)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}-{key}.npy"
    ids_file = cache_dir / f"{name}-{key}.ids.npy"
    if target.is_file() and ids_file.is_file():
        try:
            images = np.load(target, mmap_mode="r")
            cached_ids = np.load(ids_file)
            if images.shape == (len(paths), *size) and np.array_equal(cached_ids, ids_arr):
                return ImageArray(images, ids_arr, target)
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below
    _check_disk_space(cache_dir, len(paths) * size[0] * size[1])
    _build(target, ids_file, ids_arr, paths, size, mask=mask, workers=workers, progress=progress, name=name)
    for stale in cache_dir.glob(f"{name}-*.npy"):
        if stale.name not in (target.name, ids_file.name):
            stale.unlink(missing_ok=True)
    return ImageArray(np.load(target, mmap_mode="r"), ids_arr, target)


def _build(target: Path, ids_file: Path, ids: np.ndarray, paths: list[Path], size: tuple[int, int], *,
           mask: bool, workers: int | None, progress: bool, name: str) -> None:
    from .progress import bar

    notes: Counter[str] = Counter()
    examples: dict[str, Path] = {}
    with atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *size))

        def work(i: int) -> str:
            out[i], note = decode(paths[i], size, mask=mask)
            return note

        # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
        n_workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(n_workers) as pool, bar(total=len(paths), desc=f"decoding {name}",
                                                        disable=not progress, mininterval=1.0) as shown:
            for i, note in enumerate(pool.map(work, range(len(paths)))):
                shown.update()
                for part in filter(None, note.split(", ")):
                    # "300x256 resized to 256x256" and "310x256 resized ..." are one kind of fix-up.
                    kind = part[part.index("resized"):] if "resized" in part else part
                    notes[kind] += 1
                    examples.setdefault(kind, paths[i])
        out.flush()
        del out
        with atomic_path(ids_file) as tmp_ids:
            with open(tmp_ids, "wb") as fh:
                np.save(fh, ids)
    for kind, count in notes.items():
        warnings.warn(f"{count} {name} image(s): {kind}, e.g. {examples[kind]}; check the data if this "
                      "is unexpected", DataWarning, stacklevel=3)
