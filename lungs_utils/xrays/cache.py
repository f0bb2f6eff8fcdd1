"""Decode once: PNGs become one uint8 ``(N, H, W)`` array on disk, memory-mapped on every later use.

The cache file name carries a fingerprint of the file list, sizes, mtimes and target size, so any change
to the images makes a new cache (and the stale one is removed). Files are written under a temporary name
that carries the writer's pid and host, and renamed, so a killed build never leaves a cache that looks
valid, and the next build can tell its leftover temporary file from one that a live build is writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import struct
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataWarning, LungsError
from ..io import atomic_path
from ..paths import pid_alive

# 2: masks are lung where nonzero (above half their own maximum), whatever their encoding (0/1 masks
# decoded empty under 1).
CACHE_VERSION = 2  # bump when the decoding rules change, so old caches are rebuilt

# Smaller than any radiograph: a 1x1 or 8 px image is a placeholder or a broken export, and resizing the
# set to it (or it to the set) gives nothing to learn from. Same floor as `lungs phantom --size`.
MIN_SIDE = 16
# A lung mask covering more than this share of its image is not an outline of the lungs.
FULL_MASK = 0.9
# A temporary file nobody wrote for this long belongs to no live build. Builds dirty new pages of their
# temp continuously (each decoded image), and a full competition-size build takes minutes, so a day is
# far on the safe side. Used only where the pid cannot tell (another host, a temp without pid, pid reuse).
STALE_TEMP_AGE_S = 24 * 3600
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RESCUE = "re-download it, or remove it (and its row in train_answers.csv)"


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
    images, nearest for masks). Masks come out as 0 / 255 whatever their encoding (0/1, 0/255, 1-bit,
    16-bit; see :func:`_lung_pixels`). Anything PIL cannot decode, images smaller than ``MIN_SIDE``
    and images over PIL's decompression-bomb limit raise a one-line ``LungsError``; images between
    PIL's warning and error limits get a note instead of PIL's warning (which :func:`_build`
    silences, as must any other caller that decodes in threads).
    """
    try:
        with Image.open(path) as im:
            note = []
            over = _check_size(path, *im.size)
            if over:
                note.append(over)
            im.load()
            if im.format not in (None, "PNG"):
                note.append(f"{im.format} content")
            if mask:
                im = Image.fromarray(_lung_pixels(im, note).astype(np.uint8) * 255, "L")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
                note.append("16-bit scaled to 8-bit")
            elif im.mode != "L":
                im = _to_grayscale(im, note)
            if size is not None and im.size != (size[1], size[0]):
                note.append(f"{im.size[0]}x{im.size[1]} resized to {size[1]}x{size[0]}")
                im = im.resize((size[1], size[0]), Image.NEAREST if mask else Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise LungsError(f"{path}: image file is missing; re-download the data or remove its row") from None
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(path, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LungsError(f"{path}: cannot decode image ({type(exc).__name__}: {exc}); "
                         "re-download it or remove its row from train_answers.csv") from None
    return arr, ", ".join(note)


def _to_grayscale(im: Image.Image, note: list[str]) -> Image.Image:
    note.append(f"{im.mode} converted to grayscale")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Flatten transparency onto black, as a viewer of a radiograph would see it.
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("L")


def _lung_pixels(im: Image.Image, note: list[str]) -> np.ndarray:
    """Lung (True) / background of a mask at its own size, whatever its encoding.

    Lung is above half the mask's own maximum: nonzero for any binary encoding (0/1, 0/255, 0/65535,
    1-bit), and the same cut as ``> 127`` for anti-aliased 0..255 masks with grey edges from resizing.
    Only colour is a fix-up worth a note; the encodings of one binary image are all equally valid.
    """
    if im.mode == "1":
        return np.asarray(im, dtype=bool)
    if im.mode not in ("L", "I", "F") and not im.mode.startswith("I;16"):
        im = _to_grayscale(im, note)
    values = np.asarray(im)
    peak = values.max(initial=0)
    return values > peak / 2 if peak > 0 else np.zeros(values.shape, dtype=bool)


def probe_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding its pixels.

    Refuses, in one ``LungsError`` line, files that are no image and sizes no chest X-ray has (a side
    under ``MIN_SIDE``, or over PIL's decompression-bomb limit).
    """
    try:
        wh = _png_size(path)
        if wh is None:  # not a PNG (e.g. JPEG content): let PIL read the header
            with pil_bomb_warning_silenced(), Image.open(path) as im:
                wh = im.size
    except FileNotFoundError:
        raise LungsError(f"{path}: image file is missing; re-download the data or remove its row") from None
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(path, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LungsError(f"{path}: cannot decode image ({exc}); re-download it or remove its row") from None
    _check_size(path, *wh)
    return wh[1], wh[0]


def common_size(paths: Sequence[Path]) -> tuple[int, int]:
    """The most frequent (H, W) of ``paths`` (ties: the earliest), from their headers (:func:`probe_size`).

    The mode, not the first image: one odd or broken file must not decide the size of the whole set.
    """
    if not paths:
        raise ValueError("no images to take the size of")
    return Counter(probe_size(Path(p)) for p in paths).most_common(1)[0][0]


def _png_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from a PNG's IHDR chunk (24 bytes read), or None when the file is not a PNG."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) == 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(w), int(h)
    return None


def _check_size(path: Path, w: int, h: int) -> str:
    """Refuse sizes no chest X-ray has; returns a note for one over PIL's warning limit ('' if none)."""
    if min(w, h) < MIN_SIDE:
        raise LungsError(f"{path}: image is {w}x{h} pixels, too small for a chest X-ray (each side must be at "
                         f"least {MIN_SIDE} px); {_RESCUE}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > 2 * limit:
        raise _too_many_pixels(path, None, (w, h))
    if limit and w * h > limit:
        return f"over PIL's {_mega(limit)} M-pixel decompression-bomb warning limit (decoded anyway)"
    return ""


def _too_many_pixels(path: Path, exc: Exception | None, wh: tuple[int, int] | None = None) -> LungsError:
    """The one-line error for an image over PIL's decompression-bomb error limit (2 x MAX_IMAGE_PIXELS)."""
    if wh is None:
        with contextlib.suppress(OSError):
            wh = _png_size(path)
    if wh is not None:
        what = f"{wh[0]}x{wh[1]} = {_mega(wh[0] * wh[1])} M pixels"
    else:  # not a PNG: PIL's message is all that tells the size
        found = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{_mega(int(found.group(1)))} M pixels" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return LungsError(f"{path}: image is {what}, over the {_mega(limit)} M-pixel limit of PIL's "
                      "decompression-bomb check; it cannot be a chest X-ray at this size, or the file is "
                      f"damaged or malicious; {_RESCUE}")


def _mega(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


@contextlib.contextmanager
def pil_bomb_warning_silenced() -> Iterator[None]:
    # PIL's own warning names no file and is not one line; _check_size's note replaces it. The filters
    # are process-wide (Python < 3.14), so worker threads started inside see them too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


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
                  size: tuple[int, int] | None = None, *, mask: bool = False, check_coverage: bool = False,
                  workers: int | None = None, progress: bool = True) -> ImageArray:
    """Decode ``paths`` once into ``cache_dir/<name>-<fingerprint>.npy`` and return it memory-mapped.

    ``size`` (H, W) defaults to the most frequent size of ``paths`` (:func:`common_size`); others are
    resized with a warning. ``check_coverage`` (masks given with the data) warns about masks that are
    empty or cover over ``FULL_MASK`` of their image; predicted masks are left out, being empty on
    purpose where segmentation rejected its result. Temporary files of killed builds of ``name`` are
    removed first (:func:`remove_stale_temps`).
    """
    if len(paths) != len(ids):
        raise ValueError("ids and paths differ in length")
    paths = [Path(p) for p in paths]
    ids_arr = np.asarray(ids, dtype=np.int64)
    if len(paths) == 0:
        h, w = size or (0, 0)
        return ImageArray(np.zeros((0, h, w), np.uint8), ids_arr)
    if size is None:
        size = common_size(paths)
    kind = "mask" if mask else "image"
    key = fingerprint(paths, size, kind)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache_dir, name)
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
    _build(target, ids_file, ids_arr, paths, size, mask=mask, check_coverage=check_coverage, workers=workers,
           progress=progress, name=name)
    for stale in cache_dir.glob(f"{name}-*.npy"):
        if stale.name not in (target.name, ids_file.name):
            stale.unlink(missing_ok=True)
    return ImageArray(np.load(target, mmap_mode="r"), ids_arr, target)


# --------------------------------------------------------------------------------------------------
# Temporary files: named after their writer, so that a killed build's leftover can be told apart
# --------------------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _temp_prefix(target: Path, pid: int | None = None) -> str:
    """``.<target name>.<pid>@<host>.``: the name of ``target``'s temporary file up to mkstemp's random part."""
    return f".{target.name}.{os.getpid() if pid is None else pid}@{_host()}."


def remove_stale_temps(cache_dir: Path, name: str) -> list[Path]:
    """Delete the temporary arrays that killed builds of cache ``name`` left in ``cache_dir``; returns them.

    A temp is stale when the pid in its name is a dead process on this host, or when nothing wrote it
    for ``STALE_TEMP_AGE_S``: the only test possible for a writer on another host (a shared cache
    folder), for temps named without a pid (older versions, io.atomic_path) and for a pid reused since.
    A live concurrent build's temp is never removed: it is young, and its pid is alive or not ours to judge.
    """
    pattern = re.compile(rf"\.{re.escape(name)}-[0-9a-f]{{16}}(?:\.ids)?\.npy\."
                         r"(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.)?[a-z0-9_]+\.tmp")
    here, now, removed = _host(), time.time(), []
    for path in cache_dir.glob(f".{name}-*.tmp"):
        found = pattern.fullmatch(path.name)
        if found is None:
            continue
        try:
            young = now - path.stat().st_mtime < STALE_TEMP_AGE_S
        except FileNotFoundError:
            continue  # its build just finished (renamed) or another process cleaned it
        pid = found.group("pid")
        if young and (pid is None or found.group("host") != here or pid_alive(int(pid))):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _build(target: Path, ids_file: Path, ids: np.ndarray, paths: list[Path], size: tuple[int, int], *,
           mask: bool, check_coverage: bool, workers: int | None, progress: bool, name: str) -> None:
    from ..progress import bar

    notes: Counter[str] = Counter()
    examples: dict[str, Path] = {}
    empty: list[Path] = []
    full: list[Path] = []
    # The writer's pid and host in the temp name: a kill -9 leaves the temp behind (no cleanup runs),
    # and remove_stale_temps must know whether its writer still lives.
    with atomic_path(target, prefix=_temp_prefix(target)) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *size))

        def work(i: int) -> tuple[str, float | None]:
            out[i], note = decode(paths[i], size, mask=mask)
            return note, np.count_nonzero(out[i]) / out[i].size if mask and check_coverage else None

        # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
        n_workers = workers or min(8, os.cpu_count() or 1)
        with pil_bomb_warning_silenced(), ThreadPoolExecutor(n_workers) as pool, \
                bar(total=len(paths), desc=f"decoding {name}", disable=not progress, mininterval=1.0) as shown:
            for i, (note, covered) in enumerate(pool.map(work, range(len(paths)))):
                shown.update()
                for part in filter(None, note.split(", ")):
                    # "300x256 resized to 256x256" and "310x256 resized ..." are one kind of fix-up.
                    kind = part[part.index("resized"):] if "resized" in part else part
                    notes[kind] += 1
                    examples.setdefault(kind, paths[i])
                if covered == 0:
                    empty.append(paths[i])
                elif covered is not None and covered > FULL_MASK:
                    full.append(paths[i])
        out.flush()
        del out
        with atomic_path(ids_file, prefix=_temp_prefix(ids_file)) as tmp_ids:
            with open(tmp_ids, "wb") as fh:
                np.save(fh, ids)
    for kind, count in notes.items():
        warnings.warn(f"{count} {name} image(s): {kind}, e.g. {examples[kind]}; check the data if this "
                      "is unexpected", DataWarning, stacklevel=3)
    if empty:
        warnings.warn(f"{len(empty)} of {len(paths)} {name} image(s): empty lung mask (no lung pixel), e.g. "
                      f"{empty[0]}; segmentation learns no lungs from it and masked classifiers use the whole "
                      "image: check the mask files (lung pixels must be nonzero)", DataWarning, stacklevel=3)
    if full:
        warnings.warn(f"{len(full)} of {len(paths)} {name} image(s): lung mask covers over "
                      f"{FULL_MASK:.0%} of the image, e.g. {full[0]}; a lung mask outlines the lungs only: "
                      "check the mask files (background must be 0)", DataWarning, stacklevel=3)
