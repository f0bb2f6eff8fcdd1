"""Where things live — the project root, the suite's notebooks and params files, data discovery, caches,
outputs — and how a run takes its folder (claim, lock, refuse, resume, suffix, overwrite).

Discovery order for the dataset folder (the one that holds ``train_images/``):
explicit ``data_dir`` → env ``LUNGS_DATA_DIR`` → a Kaggle input mount (``/kaggle/input/**/train_answers.csv``;
env ``LUNGS_KAGGLE_INPUT`` overrides the root) → the ``lungs download`` destination → the demo's phantom
data (with a warning that it is synthetic) → a clear error that says how to get data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import DataWarning, LungsError
from .runfolder import LOCK_FILE, RUN_TRACES

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_TEMP = Path("/kaggle/temp")
#: The folder holding this package: the suite's checkout, whose git commit every run records.
CHECKOUT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The lungs checkout this code runs from (env ``LUNGS_HOME`` wins).

    Walks up from the working directory looking for the suite's ``params/`` + ``notebooks/`` pair,
    so notebooks opened from ``notebooks/`` and CLI calls from the top both land in the same place.
    Falls back to the working directory (e.g. on Kaggle).
    """
    env = os.environ.get("LUNGS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "notebooks").is_dir():
            return folder
    if (CHECKOUT / "params").is_dir() and (CHECKOUT / "notebooks").is_dir():
        return CHECKOUT
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else here


def download_dir() -> Path:
    """Where ``lungs download`` unpacks the competition zip (its ``data/`` folder lands inside)."""
    return project_root() / "data" / "competition"


def phantom_dir() -> Path:
    """Where ``lungs demo`` writes the phantom dataset (``data/phantom/data`` is the data dir)."""
    return project_root() / "data" / "phantom"


def outputs_dir() -> Path:
    """The folder holding one sub-folder per run."""
    env = os.environ.get("LUNGS_OUTPUTS")
    if env:
        return Path(env).expanduser().resolve()
    return project_root() / "outputs"


def child_pythonpath() -> str:
    """``PYTHONPATH`` for a child process (a notebook kernel, a torchrun worker) that must import this very
    package: on Kaggle the copy a bundle unpacked, which no installed one stands in for."""
    return os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))


def suite_path(*parts: str) -> Path:
    """``<project root>/<parts>`` when it exists, else the same path in this package's checkout.

    The second place lets an isolated ``LUNGS_HOME`` (tests, a scratch folder) still use the suite's
    own notebooks and params files; copies in the project root win.
    """
    here = project_root().joinpath(*parts)
    if here.exists():
        return here
    fallback = CHECKOUT.joinpath(*parts)
    return fallback if fallback.exists() else here


def find_notebook(name: str) -> Path:
    """The notebook a params file names (a file under ``notebooks/``, or a path)."""
    given = Path(name).expanduser()
    if given.suffix != ".ipynb":
        raise LungsError(f"notebook: {name!r} is not a .ipynb file; name one of notebooks/*.ipynb")
    if given.is_absolute() or len(given.parts) > 1:
        if given.is_file():
            return given.resolve()
        raise LungsError(f"notebook: {given} does not exist")
    path = suite_path("notebooks", name)
    if not path.is_file():
        folder = path.parent
        available = ", ".join(sorted(p.name for p in folder.glob("*.ipynb"))) if folder.is_dir() else ""
        raise LungsError(f"notebook: {name!r} not found in {folder}; available: {available or 'none'}")
    return path


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of the decoded-image caches: argument → env ``LUNGS_CACHE_DIR`` → Kaggle's scratch folder →
    ``data/cache`` under the project root."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("LUNGS_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if KAGGLE_TEMP.is_dir():
        # Not /kaggle/working: Kaggle keeps that folder as the notebook's output, and the cache is GBs.
        return KAGGLE_TEMP / "lungs_cache"
    return project_root() / "data" / "cache"


def dataset_cache_dir(data_dir: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """One cache folder per dataset folder, so two datasets never evict each other's cache."""
    data_dir = Path(data_dir).resolve()
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]
    slug = "-".join(p for p in (data_dir.parent.name, data_dir.name) if p)[-40:]
    return cache_root(cache_dir) / f"{slug}-{digest}"


def is_data_dir(path: Path) -> bool:
    """A folder in the competition layout (holds ``train_images/``)."""
    return (path / "train_images").is_dir()


def _kaggle_input_root() -> Path:
    return Path(os.environ.get("LUNGS_KAGGLE_INPUT", KAGGLE_INPUT))


def _from_kaggle_mount() -> Path | None:
    root = _kaggle_input_root()
    if not root.is_dir():
        return None
    # The mount layout has changed over the years (/kaggle/input/<slug>/data,
    # /kaggle/input/competitions/<slug>/..., ...): search for the answers file instead.
    hits = sorted(p.parent for p in root.rglob("train_answers.csv") if is_data_dir(p.parent))
    return hits[0] if hits else None


def _explicit(path: str | os.PathLike[str], source: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise LungsError(f"{source}: data folder {folder} does not exist; point it at the folder "
                         "that holds train_images/ (or run `lungs download` / `lungs phantom OUT`)")
    if is_data_dir(folder):
        return folder
    if is_data_dir(folder / "data"):
        # People often point at the unzipped archive, whose data/ holds the images.
        return folder / "data"
    raise LungsError(f"{source}: {folder} has no train_images/ folder; point it at the folder that "
                     "holds train_images/, test_images/ and train_answers.csv")


_SAID_SYNTHETIC: set[Path] = set()


def synthetic_notice_given() -> None:
    """The user was told in other words (``lungs demo`` says "demo data: ..."): :func:`find_data_dir`
    does not warn about the phantom data again in this process."""
    _SAID_SYNTHETIC.add(phantom_dir() / "data")


def find_data_dir(data_dir: str | os.PathLike[str] | None = None, *, allow_phantom: bool = True) -> Path:
    """Locate the dataset folder (see module docstring for the order)."""
    if data_dir is not None:
        return _explicit(data_dir, "data_dir")
    env = os.environ.get("LUNGS_DATA_DIR")
    if env:
        return _explicit(env, "LUNGS_DATA_DIR")
    found = _from_kaggle_mount()
    if found is not None:
        return found
    for candidate in (download_dir() / "data", download_dir()):
        if is_data_dir(candidate):
            return candidate
    phantom = phantom_dir() / "data"
    if allow_phantom and is_data_dir(phantom):
        if phantom not in _SAID_SYNTHETIC:  # once per process: a pipeline finds the data once per run
            _SAID_SYNTHETIC.add(phantom)
            warnings.warn(f"using the SYNTHETIC phantom dataset at {phantom} (no real data found): "
                          "results say nothing about real X-rays; run `lungs download` for the "
                          "competition data", DataWarning, stacklevel=2)
        return phantom
    raise LungsError("no dataset found: run `lungs download` (needs Kaggle credentials) or "
                     "`lungs phantom data/phantom` for synthetic data, or set data_dir / LUNGS_DATA_DIR "
                     "to the folder that holds train_images/")


# --------------------------------------------------------------------------------------------------
# Run folders: where a run goes, and whether it may be written there
# --------------------------------------------------------------------------------------------------
#: Set (to the folder's absolute path) by ``lungs run`` for the notebook's kernel and by ``lungs train``
#: in-process: that folder was claimed by the command that runs this code, so it is ours to write.
CLAIMED_ENV = "LUNGS_CLAIMED_RUN_DIR"
#: Carries ``lungs run``'s time estimate into the notebook it runs (and a notebook's into its torchrun
#: workers), so the run's first line repeats it instead of timing it again.
ESTIMATE_ENV = "LUNGS_ESTIMATE"


def run_dir(params: Mapping[str, Any]) -> Path:
    """A run's folder: ``output_dir`` when set, else ``outputs/<run_name>``."""
    return Path(params["output_dir"]) if params.get("output_dir") else outputs_dir() / params["run_name"]


def named_run(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """A run named on the command line or in ``runs``: the folder itself when ``name`` is one, else
    ``<root>/<name>`` (root: ``outputs/``), which may not exist."""
    given = Path(name).expanduser()
    return given if given.is_dir() else (Path(root) if root is not None else outputs_dir()) / str(name)


def _is_trace(folder: Path, path: Path) -> bool:
    return path.parent == folder and (path.name in RUN_TRACES or path.suffix == ".ipynb")


def run_product(folder: Path) -> Path | None:
    """The first file in ``folder`` that a run produced (checkpoints, metrics, predictions, plots, masks,
    ...), or None when the folder is absent or holds only :data:`RUN_TRACES` and executed notebooks."""
    if not folder.is_dir():
        return None
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not _is_trace(folder, path):
                return path
    return None


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(folder: Path) -> int | None:
    """PID of the live run holding ``folder``'s lock, or None (no lock, or a stale one)."""
    lock = folder / LOCK_FILE
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), info.get("host")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Being written right now (created, not yet filled) or garbage: trust it only while young.
        try:
            return -1 if time.time() - lock.stat().st_mtime < 10 else None
        except OSError:
            return None
    if host and host != socket.gethostname():
        return pid  # another machine's process: we cannot tell, so assume it is alive
    return pid if pid_alive(pid) else None


def already_running(name: str, folder: Path, pid: int) -> LungsError:
    who = f"pid {pid}" if pid > 0 else "another process"
    return LungsError(f"run {name} is already running ({who} holds {folder / LOCK_FILE}); wait for it to "
                      "finish or give this run another name (-p run_name=...)")


def claimed_here(folder: Path) -> bool:
    """True when the command running this code already claimed ``folder`` (``lungs run`` / ``lungs train``)."""
    mark = os.environ.get(CLAIMED_ENV)
    return bool(mark) and Path(mark).resolve() == folder.resolve()


def check_run_dir(params: Mapping[str, Any]) -> Path:
    """Refuse to write over a run: the folder for ``params`` if it is free, reusable or deliberately taken.

    Free: absent, or holding only the traces of a start that produced nothing. Taken deliberately:
    ``resume`` (continue it) or ``overwrite`` (replace it). Anything else is a one-line error with those
    options. Nothing is written here; :func:`make_run_dir` does that once the run's inputs are known good.
    """
    folder = run_dir(params)
    if claimed_here(folder):
        return folder
    pid = lock_holder(folder)
    if pid is not None:
        raise already_running(folder.name, folder, pid)
    if params.get("resume") or params.get("overwrite"):
        return folder
    product = run_product(folder)
    if product is not None:
        raise LungsError(f"run folder {folder} already holds a run ({product.relative_to(folder)}): continue "
                         "it with resume = True (-p resume=true), choose another run_name, or replace it "
                         "with overwrite = True (-p overwrite=true)")
    return folder


def make_run_dir(params: Mapping[str, Any]) -> Path:
    """Create the run folder (checked by :func:`check_run_dir`): with ``overwrite`` the old run is removed
    first, the traces of a start that produced nothing always are; fails in one line when not writable."""
    folder = check_run_dir(params)
    if folder.is_dir():
        remove_leftovers(folder)
    if not claimed_here(folder) and not params.get("resume") and folder.is_dir():
        for entry in list(folder.iterdir()):
            if params.get("overwrite") or _is_trace(folder, entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
    ensure_writable(folder)
    return folder


def remove_leftovers(folder: Path) -> None:
    """The temporary files (``.<name>.<random>.tmp``) of writes a killed run left in its folder: a folder is
    only ever written by the run that holds it, so any there now are dead (the final names were never
    touched)."""
    for leftover in sorted(folder.rglob(".*.tmp"), reverse=True):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def ensure_writable(folder: Path) -> None:
    """Make ``folder`` (and parents) and check a file can be written in it, else one actionable line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LungsError(f"cannot write the run folder {folder} ({exc.strerror or type(exc).__name__}); make it "
                         "writable, or set LUNGS_OUTPUTS (or output_dir) to a writable folder") from None


# --------------------------------------------------------------------------------------------------
# Claiming a run folder: refuse, resume, suffix or overwrite, and a lock against a second run
# --------------------------------------------------------------------------------------------------
ON_EXISTS = ("error", "resume", "suffix")


def timestamp() -> str:
    """Now, as run records write it (ISO 8601, local time with its offset)."""
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def acquire_lock(folder: Path, name: str) -> Path:
    """Create ``folder/.lock`` exclusively (a stale lock of a dead process is replaced)."""
    lock = folder / LOCK_FILE
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            # O_EXCL, not an atomic rename: creating the file *is* the test-and-set.
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = lock_holder(folder)
            if pid is not None:
                raise already_running(name, folder, pid) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": timestamp()}, fh)
        return lock
    raise LungsError(f"could not take the lock {lock}; remove it if no run of {name} is active")


def claim(values: dict[str, Any], on_exists: str) -> tuple[Path, bool]:
    """Decide the run folder per ``on_exists`` (and ``overwrite``), take its lock; returns (folder, resumed).

    A folder holding a run is refused, resumed or suffixed as ``on_exists`` says, or replaced with
    ``overwrite``; one holding only the traces of a start that produced nothing is reused
    (:func:`make_run_dir`). ``values`` is updated to match (``resume``, ``run_name`` / ``output_dir``).
    """
    if on_exists not in ON_EXISTS:
        raise ValueError(f"on_exists must be one of {ON_EXISTS}, got {on_exists!r}")
    if values["resume"]:
        on_exists = "resume"
    folder = run_dir(values)
    name = folder.name
    resumed = False
    pid = lock_holder(folder)
    if pid is not None:
        raise already_running(name, folder, pid)
    product = run_product(folder)
    if product is not None and not values["overwrite"]:
        if on_exists == "error":
            raise LungsError(f"run folder {folder} already holds a run ({product.relative_to(folder)}): continue it "
                             f"with -p resume=true (--resume), start {name}-2 with --suffix, or replace it with "
                             "-p overwrite=true (--overwrite)")
        if on_exists == "resume":
            values["resume"] = resumed = True
        else:
            folder = _next_free(folder)
            if values["output_dir"]:
                values["output_dir"] = str(folder)
            else:
                values["run_name"] = folder.name
    make_run_dir(values)
    acquire_lock(folder, folder.name)
    return folder, resumed


@contextlib.contextmanager
def claimed(values: dict[str, Any], on_exists: str = "error") -> Iterator[tuple[Path, bool]]:
    """Claim the run folder (:func:`claim`) and hold its lock for the block; yields (folder, resumed).
    Used by ``lungs train``, which has no notebook around it: code in the block sees the folder as
    claimed (:func:`claimed_here`)."""
    folder, resumed = claim(values, on_exists)
    saved = os.environ.get(CLAIMED_ENV)
    os.environ[CLAIMED_ENV] = str(folder.resolve())
    try:
        yield folder, resumed
    finally:
        if saved is None:
            os.environ.pop(CLAIMED_ENV, None)
        else:
            os.environ[CLAIMED_ENV] = saved
        release(folder)


def release(folder: Path) -> None:
    """Give up the lock this process holds on ``folder``."""
    (folder / LOCK_FILE).unlink(missing_ok=True)


def _next_free(folder: Path) -> Path:
    k = 2
    while True:
        candidate = folder.with_name(f"{folder.name}-{k}")
        try:
            candidate.mkdir(parents=True)  # exclusive: two suffix runs never pick the same name
            return candidate
        except FileExistsError:
            k += 1
