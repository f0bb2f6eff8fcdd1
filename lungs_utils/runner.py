"""Execute notebooks with papermill from params files: ``lungs run`` and ``lungs pipeline``.

A run is ``params/<x>.yaml`` (+ ``-p key=value`` overrides) → the notebook named by its ``notebook:``
key, executed into ``outputs/<run_name>/<notebook>`` with the resolved params injected after its
``parameters`` cell. Beside the executed notebook the runner writes ``params.yaml`` (resolved) and
``run.json`` (git commit, package versions, device, CPU kind, timings, status); the notebook writes the rest.

An existing run folder is never overwritten silently: ``on_exists`` is ``error`` (the default, whose
message names the options), ``resume`` (same folder, ``resume: true`` so training continues from
``checkpoints/last.pt``) or ``suffix`` (a new ``<run_name>-2``, ``-3``, ...). A lock file stops two
runs with the same name from writing into one folder at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import params as params_mod
from .errors import LungsError
from .hardware import cpu_kind, describe_cpu
from .io import atomic_write_text
from .paths import (CLAIMED_ENV, LOCK_FILE, already_running, lock_holder, make_run_dir, project_root, run_dir,
                    run_product)

ON_EXISTS = ("error", "resume", "suffix")
#: The notebook kernel's own stderr (its log; not cell output) goes here, in the run folder.
KERNEL_LOG = "kernel.log"
RUN_FILE = "run.json"
#: Packages whose versions every run.json records (distribution names).
VERSIONED = ("torch", "torchvision", "numpy", "pandas", "papermill", "lungs")
_PATH_KEYS = ("data_dir", "cache_dir", "output_dir")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

Overrides = Iterable[str] | Mapping[str, Any]


@dataclass
class RunRecord:
    """What one run did: where it went, how it ended, how long it took, its validation score."""

    name: str
    params_file: Path | None
    run_dir: Path | None
    notebook: Path | None  # the executed notebook
    status: str  # ok / failed / interrupted
    seconds: float = 0.0
    val_macro_f1: float | None = None
    error: str | None = None
    test_macro_f1: float | None = None  # scored against a truth file (``lungs pipeline --answers``)
    test_ci: tuple[float, float] | None = None  # its 95 % bootstrap interval over the test images
    val_ci: tuple[float, float] | None = None  # the validation macro-F1's 95 % bootstrap interval
    #: The gap to the pipeline's first scored run, paired over the same test images (value, low, high).
    vs_first: tuple[float, float, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------------------
# Finding things
# ------------------------------------------------------------------------------------------------
def suite_path(*parts: str) -> Path:
    """``<project root>/<parts>`` when it exists, else the same path in this package's checkout.

    The second place lets an isolated ``LUNGS_HOME`` (tests, a scratch folder) still use the suite's
    own notebooks and params files; copies in the project root win.
    """
    here = project_root().joinpath(*parts)
    if here.exists():
        return here
    fallback = _PACKAGE_ROOT.joinpath(*parts)
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


def expand(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Params files from files and folders (a folder means its ``*.yaml``, sorted by name)."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.exists() and not path.is_absolute():
            path = suite_path(str(item))
        if path.is_dir():
            found = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
            if not found:
                raise LungsError(f"{path} holds no *.yaml params files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LungsError(f"params file or folder not found: {item}")
    return files


def resolve(params_file: str | os.PathLike[str] | None, overrides: Overrides = ()) -> dict[str, Any]:
    """Validated params (defaults ← file ← overrides) with relative paths made absolute.

    The kernel runs in ``notebooks/``, so a relative ``data_dir`` would otherwise change meaning.
    """
    values = params_mod.load(params_file, overrides)
    for key in _PATH_KEYS:
        if values[key]:
            values[key] = str(Path(values[key]).expanduser().resolve())
    return values


def _check_runnable(values: Mapping[str, Any]) -> Path:
    """Fail before any folder is made: notebook present, model registered, device available."""
    from . import models
    from .train import select_device

    notebook = find_notebook(values["notebook"])
    if values["model"] not in models.names():
        raise LungsError(f"params: unknown model {values['model']!r}; valid names: {', '.join(models.names())}")
    select_device(values["device"])
    return notebook


# ------------------------------------------------------------------------------------------------
# Run folder: existing folders, suffixes, lock
# ------------------------------------------------------------------------------------------------
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
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}, fh)
        return lock
    raise LungsError(f"could not take the lock {lock}; remove it if no run of {name} is active")


def _claim(values: dict[str, Any], on_exists: str) -> tuple[Path, bool]:
    """Decide the run folder per ``on_exists`` (and ``overwrite``), take its lock; returns (folder, resumed).

    A folder holding a run is refused, resumed or suffixed as ``on_exists`` says, or replaced with
    ``overwrite``; one holding only the traces of a start that produced nothing is reused
    (:func:`lungs_utils.paths.make_run_dir`).
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
    """Claim the run folder (refuse / resume / suffix / overwrite) and hold its lock for the block; yields
    (folder, resumed). Used by ``lungs train``, which has no notebook around it: code in the block sees
    the folder as claimed (:func:`lungs_utils.paths.claimed_here`)."""
    folder, resumed = _claim(values, on_exists)
    saved = os.environ.get(CLAIMED_ENV)
    os.environ[CLAIMED_ENV] = str(folder.resolve())
    try:
        yield folder, resumed
    finally:
        if saved is None:
            os.environ.pop(CLAIMED_ENV, None)
        else:
            os.environ[CLAIMED_ENV] = saved
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


# ------------------------------------------------------------------------------------------------
# run.json
# ------------------------------------------------------------------------------------------------
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_commit(folder: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout (None outside git or before the first commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder or _PACKAGE_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device_description(name: str) -> str:
    """The device a run with ``device: name`` gets on this machine, e.g. ``cuda:0 (NVIDIA H100)`` or
    ``cpu (AMD EPYC, 2 cores, AVX512-BF16)``."""
    import torch

    from .train import select_device

    device = select_device(name)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({describe_cpu()})"


def _write_run_json(folder: Path, info: Mapping[str, Any]) -> None:
    atomic_write_text(folder / RUN_FILE, json.dumps(dict(info), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------
class _DropUnknownParameter(logging.Filter):
    # The runner injects every resolved param, most of which the parameters cell does not list;
    # papermill warns about each one. Those warnings are expected noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Passed unknown parameter" not in record.getMessage()


@contextlib.contextmanager
def _kernel_environment(**values: str) -> Iterator[None]:
    """Environment variables for the kernel papermill starts (it inherits ours)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    log = logging.getLogger("papermill")
    quiet = _DropUnknownParameter()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _kernel_manager(log: Path) -> type:
    """A kernel manager whose kernel writes its own stderr (ipykernel's log, not cell output, which the
    notebook keeps) to ``log``: on Ctrl-C or shutdown a kernel logs tracebacks of its closing sockets,
    and those belong in a file, not over the one ``interrupted`` line in the terminal."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            self._stderr_log = open(log, "ab")  # noqa: SIM115 - the kernel process holds it until it exits
            kw.setdefault("stderr", self._stderr_log)
            await super().start_kernel(**kw)

        async def shutdown_kernel(self, *args: Any, **kw: Any) -> None:
            try:
                await super().shutdown_kernel(*args, **kw)
            finally:
                self._stderr_log.close()

    return LoggedKernelManager


def _error_line(exc: BaseException) -> tuple[str, int | None]:
    """One line for a failed execution, and the failing cell's execution count when known."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        lines = [ln.strip() for ln in str(exc.evalue or "").splitlines() if ln.strip()]
        return f"{exc.ename}: {lines[0] if lines else ''}".rstrip(": "), exc.exec_count
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "), None


def _val_f1(folder: Path, since: float) -> tuple[float | None, tuple[float, float] | None]:
    """The run's validation macro-F1 and its interval, from the metrics.json this session wrote."""
    path = folder / "metrics.json"
    try:
        if path.stat().st_mtime + 1 < since:
            return None, None  # left over from an earlier session of this folder
        metrics = json.loads(path.read_text(encoding="utf-8"))
        value, ci = metrics.get("val_macro_f1"), metrics.get("val_macro_f1_ci")
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(value, (int, float)):
        return None, None
    return float(value), (tuple(ci) if isinstance(ci, list) and len(ci) == 2 else None)  # type: ignore[return-value]


def estimate_line(values: Mapping[str, Any], progress: bool = False, detail: bool = False) -> str | None:
    """The expected minutes of a run that trains (:mod:`lungs_utils.estimate`), measured here (``detail``:
    with what was timed); None for the notebooks that train nothing (data, ensemble, leaderboard, explore)."""
    from .estimate import for_params, trains

    return for_params(values, progress=progress).line(detail) if trains(values["notebook"]) else None


def execute(params_file: str | os.PathLike[str] | None, overrides: Overrides = (), *,
            on_exists: str = "error", progress_bar: bool = False, say: Any = print) -> RunRecord:
    """Run one params file; notebook failures come back as a failed record (see :func:`run`). A run that
    trains first says (``say``) how long it should take, and its notebook shows the same line.

    Problems found before execution (bad params, missing notebook, existing folder, lock) raise
    ``LungsError``.
    """
    from .estimate import ESTIMATE_ENV

    params_file = Path(params_file) if params_file is not None else None
    if not isinstance(overrides, Mapping):
        overrides = list(overrides)
    values = resolve(params_file, overrides)
    notebook_in = _check_runnable(values)
    given = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else overrides
    folder, resumed = _claim(values, on_exists)
    try:
        from .train import check_resume

        check_resume(folder, values)  # before params.yaml is rewritten
        # Measured once the folder is ours (a refused run waits for nothing) and named as it will be
        # (--suffix), with the epochs a resume leaves to train.
        expected = estimate_line(values, progress=progress_bar)
    except BaseException:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        raise
    if expected:
        say(f"{folder.name}: {expected}")
    executed = folder / notebook_in.name
    started_wall, t0 = time.time(), time.perf_counter()
    info: dict[str, Any] = {"run_name": folder.name, "status": "running", "started": _now()}
    error: str | None = None
    status = "failed"
    try:
        info.update({
            "notebook": values["notebook"],
            "executed_notebook": str(executed),
            "params_file": str(params_file) if params_file else None,
            "overrides": list(given),
            "resumed": resumed,
            "error": None,
            "finished": None,
            "wall_seconds": None,
            "git_commit": git_commit(),
            "versions": versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "host": socket.gethostname(),
            "device": device_description(values["device"]),
            # Also on GPU runs: the CPU decodes, augments and caches, and the machines' CPUs differ.
            "cpu": cpu_kind(),
        })
        params_mod.dump(values, folder / "params.yaml")
        _write_run_json(folder, info)
        import papermill

        # Plain-text progress: widget bars become unreadable JSON in an executed notebook.
        env = {"LUNGS_PROGRESS": "off" if os.environ.get("LUNGS_PROGRESS") == "off" else "plain",
               "LUNGS_HOME": str(project_root()), CLAIMED_ENV: str(folder.resolve()),
               ESTIMATE_ENV: expected or ""}
        with _kernel_environment(**env):
            papermill.execute_notebook(str(notebook_in), str(executed), parameters=values,
                                       cwd=str(notebook_in.parent), kernel_name="python3",
                                       kernel_manager_class=_kernel_manager(folder / KERNEL_LOG),
                                       log_output=False, progress_bar=progress_bar,
                                       # Kernel log warnings (e.g. "running over TCP without
                                       # encryption" on localhost) are noise in batch logs.
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
        status = "ok"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the notebook or kernel is the run's failure
        line, cell = _error_line(exc)
        where = f" in cell [{cell}]" if cell is not None else ""
        error = f"{line}{where}; see {executed}"
    finally:
        seconds = time.perf_counter() - t0
        info.update(status=status, error=error, finished=_now(), wall_seconds=round(seconds, 2))
        try:
            _write_run_json(folder, info)
        finally:
            (folder / LOCK_FILE).unlink(missing_ok=True)
    f1, ci = _val_f1(folder, started_wall) if status == "ok" else (None, None)
    return RunRecord(folder.name, params_file, folder, executed if executed.is_file() else None, status,
                     seconds, f1, error, val_ci=ci)


def run(params_file: str | os.PathLike[str] | None, overrides: Overrides = (), *, on_exists: str = "error",
        progress_bar: bool = False) -> RunRecord:
    """Execute one params file's notebook into its run folder; a failure raises a one-line ``LungsError``
    naming the executed notebook and the failing cell's error."""
    record = execute(params_file, overrides, on_exists=on_exists, progress_bar=progress_bar)
    if not record.ok:
        raise LungsError(f"run {record.name} failed: {record.error}")
    return record


def pipeline(paths: Sequence[str | os.PathLike[str]], overrides: Overrides = (), *, on_exists: str = "error",
             echo: bool = True, answers: str | os.PathLike[str] | None = None) -> list[RunRecord]:
    """Run several params files in order (folders expand to their sorted ``*.yaml``).

    A failing run is reported (with its executed notebook) and the rest still run. Overrides apply
    to every run (e.g. ``epochs=1`` for a smoke test). With ``answers`` (a truth file
    ``id,target_feature`` for the test images, e.g. a held-out set's answer key), every run's
    ``submission.csv`` is scored too (``test_macro_f1`` with its 95 % interval), and each run's gap to the
    first scored run, paired over the same test images (``vs_first``: e.g. each mask mode against none).
    """
    from .submission import compare_submissions, validate_submission
    from .progress import bar

    files = expand(paths)
    fixed = dict(overrides) if isinstance(overrides, Mapping) else params_mod.parse_overrides(overrides)
    if answers is not None:
        validate_submission(answers)  # a bad truth file fails before hours of training, not after
    records: list[RunRecord] = []
    with bar(total=len(files), desc="pipeline", unit="run", disable=not echo) as progress:
        for path in files:
            progress.set_postfix_str(path.stem)
            try:
                record = execute(path, fixed, on_exists=on_exists,
                                 say=lambda line: progress.write(line) if echo else None)
            except LungsError as exc:
                record = RunRecord(path.stem, path, None, None, "failed", error=str(exc))
            submission = record.run_dir / "submission.csv" if record.run_dir is not None else None
            if answers is not None and record.ok and submission is not None and submission.is_file():
                try:
                    row = compare_submissions([submission], answers)[0]
                    record.test_macro_f1, record.test_ci = row["macro_f1"], (row["low"], row["high"])
                except LungsError as exc:  # e.g. a truth file of another test set: say so, keep going
                    progress.write(f"cannot score {record.name}: {exc}", file=sys.stderr)
            records.append(record)
            if echo and not record.ok:
                progress.write(f"FAILED {path}: {record.error}", file=sys.stderr)
            progress.update()
    scored = [r for r in records if r.test_macro_f1 is not None]
    if answers is not None and len(scored) > 1:
        rows = compare_submissions([r.run_dir / "submission.csv" for r in scored], answers)  # type: ignore[operator]
        for record, row in zip(scored[1:], rows[1:]):
            gap = row["vs_first"]
            record.vs_first = (gap["value"], gap["low"], gap["high"])
    return records


def summary_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: run, status, val macro-F1 (and test macro-F1 when scored), minutes, executed notebook."""
    columns: dict[str, list[Any]] = {
        "run": [r.name for r in records],
        "status": [r.status for r in records],
        "val_macro_f1": [r.val_macro_f1 for r in records],
    }
    if any(r.test_macro_f1 is not None for r in records):
        columns["test_macro_f1"] = [r.test_macro_f1 for r in records]
        columns["test_95ci"] = [f"{r.test_ci[0]:.3f}-{r.test_ci[1]:.3f}" if r.test_ci else "-" for r in records]
        first = next(r.name for r in records if r.test_macro_f1 is not None)
        columns[f"vs_{first}"] = [_gap_text(r.vs_first) if r.vs_first else "-" for r in records]
    columns["minutes"] = [round(r.seconds / 60, 2) for r in records]
    columns["notebook"] = [str(r.notebook) if r.notebook else "-" for r in records]
    return pd.DataFrame(columns)


def _gap_text(gap: tuple[float, float, float]) -> str:
    value, low, high = gap
    word = "ahead" if low > 0 else "behind" if high < 0 else "within noise"
    return f"{value:+.3f} ({low:+.3f} to {high:+.3f}) {word}"


def format_summary(records: Sequence[RunRecord]) -> str:
    """:func:`summary_table` as aligned text (F1 with 4 decimals, '-' where there is none)."""
    table = summary_table(records)
    for column in ("val_macro_f1", "test_macro_f1"):
        if column in table:
            table[column] = [f"{v:.4f}" if v is not None and not pd.isna(v) else "-" for v in table[column]]
    return table.to_string(index=False)
