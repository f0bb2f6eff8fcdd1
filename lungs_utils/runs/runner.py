"""Execute a notebook with papermill from a params file (``lungs run``), or train in this process
(``lungs train``, and each torchrun worker).

A run is ``params/<x>.yaml`` (+ ``-p key=value`` overrides) → the notebook named by its ``notebook:``
key, executed into ``outputs/<run_name>/<notebook>`` with the resolved params injected after its
``parameters`` cell. Beside the executed notebook the runner writes ``params.yaml`` (resolved) and
``run.json`` (:mod:`~lungs_utils.runs.provenance`: git commit, package versions, device, CPU kind,
timings, status); the notebook writes the rest.

An existing run folder is never overwritten silently (:func:`lungs_utils.paths.claim`): ``on_exists`` is
``error`` (the default, whose message names the options), ``resume`` (same folder, ``resume: true`` so
training continues from ``checkpoints/last.pt``) or ``suffix`` (a new ``<run_name>-2``, ``-3``, ...). A
lock file stops two runs with the same name from writing into one folder at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import params as params_mod
from ..errors import LungsError
from ..paths import (CLAIMED_ENV, ESTIMATE_ENV, child_pythonpath, claim, find_notebook, project_root, release,
                     suite_path, timestamp)
from ..runfolder import KERNEL_LOG, METRICS_FILE, PARAMS_FILE
from .provenance import machine, write_run_json

if TYPE_CHECKING:
    from ..engine.estimate import Estimate
    from ..stats.bootstrap import Interval

_PATH_KEYS = ("data_dir", "cache_dir", "output_dir")

Overrides = Iterable[str] | Mapping[str, Any]
#: The error a sweep trial's notebook ends with when its pruner stops it (optuna.TrialPruned).
PRUNED_ERROR = "TrialPruned"


@dataclass
class RunRecord:
    """What one run did: where it went, how it ended, how long it took, its validation score."""

    name: str
    params_file: Path | None
    run_dir: Path | None
    notebook: Path | None  # the executed notebook
    status: str  # ok / failed / interrupted / pruned (a sweep trial its pruner stopped)
    seconds: float = 0.0
    val_macro_f1: float | None = None
    error: str | None = None
    test_macro_f1: float | None = None  # scored against a truth file (``lungs pipeline --answers``)
    test_ci: tuple[float, float] | None = None  # its 95 % bootstrap interval over the test images
    val_ci: tuple[float, float] | None = None  # the validation macro-F1's 95 % bootstrap interval
    #: The gap to the pipeline's first scored run, paired over the same test images.
    vs_first: Interval | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------------------
# Params files
# ------------------------------------------------------------------------------------------------
def expand(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Params files from files and folders (a folder means its ``*.yaml``, sorted by name).

    A relative path that is not found here is looked up in the suite, then under its ``params/`` (so a
    notebook whose kernel runs in ``notebooks/`` can name ``cpu_small.yaml`` or ``demo/15_resnet_tiny.yaml``).
    """
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.exists() and not path.is_absolute():
            path = suite_path(str(item))
            if not path.exists():
                path = suite_path("params", str(item))
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


def check_runnable(values: Mapping[str, Any]) -> Path:
    """Fail before any folder is made: notebook present, model registered, device available; returns the
    notebook."""
    from .. import models
    from ..engine.device import select_device

    notebook = find_notebook(values["notebook"])
    models.options(values["model"])  # an unknown name is one line listing the valid ones
    select_device(values["device"])
    return notebook


def trains(notebook: str) -> bool:
    """Whether a suite notebook trains a model (what an estimate is for), from its source."""
    text = find_notebook(notebook).read_text(encoding="utf-8")
    return "experiment.train(" in text or "segmentation.train_folds(" in text


def estimate(values: Mapping[str, Any], progress: bool = False) -> Estimate | None:
    """The expected minutes of a run that trains (:mod:`lungs_utils.engine.estimate`), measured here; None
    for the notebooks that train nothing (data, ensemble, leaderboard, explore)."""
    from ..engine.estimate import for_params

    return for_params(values, progress=progress) if trains(values["notebook"]) else None


def estimate_line(values: Mapping[str, Any], progress: bool = False, detail: bool = False) -> str | None:
    """:func:`estimate` as its one line (``detail``: with what was timed)."""
    found = estimate(values, progress)
    return found.line(detail) if found else None


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
    from ..runfolder import read_json

    path = folder / METRICS_FILE
    try:
        if path.stat().st_mtime + 1 < since:
            return None, None  # left over from an earlier session of this folder
    except OSError:
        return None, None
    metrics = read_json(path)
    value, ci = metrics.get("val_macro_f1"), metrics.get("val_macro_f1_ci")
    if not isinstance(value, (int, float)):
        return None, None
    return float(value), (tuple(ci) if isinstance(ci, list) and len(ci) == 2 else None)  # type: ignore[return-value]


def execute(params_file: str | os.PathLike[str] | None, overrides: Overrides = (), *,
            on_exists: str = "error", progress_bar: bool = False, say: Any = print) -> RunRecord:
    """Run one params file; notebook failures come back as a failed record (see :func:`run`). A run that
    trains first says (``say``) how long it should take, and its notebook shows the same line.

    Problems found before execution (bad params, missing notebook, existing folder, lock) raise
    ``LungsError``.
    """
    params_file = Path(params_file) if params_file is not None else None
    if not isinstance(overrides, Mapping):
        overrides = list(overrides)
    values = resolve(params_file, overrides)
    notebook_in = check_runnable(values)
    given = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else overrides
    folder, resumed = claim(values, on_exists)
    try:
        from ..engine.checkpoint import check_resume

        check_resume(folder, values)  # before params.yaml is rewritten
        # Measured once the folder is ours (a refused run waits for nothing) and named as it will be
        # (--suffix), with the epochs a resume leaves to train.
        expected = estimate(values, progress=progress_bar)
    except BaseException:
        release(folder)
        raise
    if expected:
        say(f"{folder.name}: {expected.line()}")
    executed = folder / notebook_in.name
    started_wall, t0 = time.time(), time.perf_counter()
    info: dict[str, Any] = {"run_name": folder.name, "status": "running", "started": timestamp()}
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
            **machine(values["device"]),
        })
        params_mod.dump(values, folder / PARAMS_FILE)
        write_run_json(folder, info)
        import papermill

        # Plain-text progress: widget bars become unreadable JSON in an executed notebook.
        env = {"LUNGS_PROGRESS": "off" if os.environ.get("LUNGS_PROGRESS") == "off" else "plain",
               "LUNGS_HOME": str(project_root()), CLAIMED_ENV: str(folder.resolve()), "PYTHONPATH": child_pythonpath(),
               ESTIMATE_ENV: expected.to_json() if expected else ""}
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
        if line.startswith(PRUNED_ERROR):  # a sweep's pruner stopped this trial (runs.trial): not a failure
            status, error = "pruned", line.removeprefix(PRUNED_ERROR).lstrip(": ")
    finally:
        seconds = time.perf_counter() - t0
        info.update(status=status, error=error, finished=timestamp(), wall_seconds=round(seconds, 2))
        try:
            write_run_json(folder, info)
        finally:
            release(folder)
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


def train(values: Mapping[str, Any]) -> dict[str, Any]:
    """Train in this process (``lungs train``; under torchrun, each worker): a lung-segmentation run when
    the params name its notebook, else a classification run; returns its metrics. Under torchrun the
    process joins the group first, and only rank 0 writes the run folder."""
    from ..engine.distributed import init_process_group, leave_process_group
    from . import experiment, segmentation

    rank, _world = init_process_group()
    try:
        if params_mod.is_segmentation(values):
            return segmentation.run(values, progress=rank == 0).outputs.get("metrics", {})
        return experiment.run(values, progress=rank == 0).outputs["metrics"]
    finally:
        leave_process_group()
