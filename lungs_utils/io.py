"""Crash-safe file writing: every file the suite writes goes to a temporary name, then is renamed.

A kill at any moment leaves either the old file or the new one, never a half-written one; a disk that
fills up during a write is one error line (:func:`no_room`), with the old file intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import LungsError

#: Under this much free space, a write that failed for an unnamed reason failed for want of room (torch.save
#: reports a full disk from its zip writer as ``RuntimeError: ... unexpected pos ...``).
LOW_SPACE = 16 << 20


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def no_room(exc: BaseException, folder: Path) -> LungsError | None:
    """The one error line for a write that failed because the disk is full, or None when it failed for
    another reason."""
    free = _free(folder)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(exc, RuntimeError) and free is not None and free < LOW_SPACE)
    if not full:
        return None
    room = f"{free / 2**20:.0f} MB free" if free is not None else "no room"
    return LungsError(f"the disk holding {folder} is full ({room}): free space there, or point LUNGS_OUTPUTS "
                      "(runs) or LUNGS_CACHE_DIR (decoded images) at a disk with room, then run the command "
                      "again (a run continues with --resume); nothing was left half-written")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched. The temporary name
    starts with ``prefix`` (default ``.<name>.``) and ends in ``.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        tmp_path.unlink(missing_ok=True)  # first: the space it took is what the check below looks at
        full = no_room(exc, path.parent)
        if full is not None:
            raise full from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces the folder ``path`` whole.

    For sets of files that belong together (e.g. predicted masks): a kill leaves the old set or the
    new one, never a mix. On any exception the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            full = no_room(exc, path.parent)
            if full is not None:
                raise full from None
            raise
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` that writes to a temporary file and renames it into place on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_csv(df: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, **kwargs)
