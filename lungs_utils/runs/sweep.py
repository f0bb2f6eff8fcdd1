"""A hyper-parameter study of a recipe (``lungs sweep``, ``97_sweep.ipynb``): Optuna's TPE sampler proposes
values from a search space, each trial is a normal run of the recipe with them (``outputs/<sweep>-t<n>/``:
notebook, history, metrics, predictions, so the leaderboard and the report see it), a pruner fed by each
trial's per-epoch validation macro-F1 stops the hopeless ones (:mod:`lungs_utils.runs.trial`), and the study
lives in SQLite in the sweep's own folder, so a killed sweep goes on where it stopped (the trial it was in
resumes from its last checkpoint) and ``optuna-dashboard sqlite:///outputs/<sweep>/study.db`` opens it.

The sweep folder (``outputs/<sweep>/``) holds ``sweep.json`` (what is tuned, against what), ``study.db``,
``trials.csv`` (the trials ranked with 95 % intervals; each against the best, paired on the same films) and
``best.yaml`` (the best trial's recipe, ready for ``lungs run``, with its estimate). The first trial is the
recipe as given, when its values lie in the space: the baseline every other trial is compared with.

A search space is YAML, one recipe key per entry: ``{low, high}`` (``log: true``, ``step``) or
``{choices: [...]}``; every key must be a params key a recipe may tune, every bound and choice valid for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import params as params_mod
from ..errors import LungsError
from ..io import atomic_write_csv, atomic_write_text
from ..paths import find_notebook, suite_path
from ..runfolder import METRICS_FILE, read_json
from ..stats.bootstrap import WITHIN_NOISE
from . import runner

#: The space a sweep searches unless ``space`` names another (under params/).
DEFAULT_SPACE = "sweep/cpu_space.yaml"
SWEEP_FILE, STUDY_FILE, TRIALS_FILE, BEST_FILE = "sweep.json", "study.db", "trials.csv", "best.yaml"
#: Keys a space may not search: where and what runs, the split (trials are compared on the same films), the
#: sweep's own settings.
FIXED = {"notebook", "run_name", "data_dir", "output_dir", "cache_dir", "seed", "device", "resume", "overwrite",
         "distributed", "nproc_per_node", "cv", "val_fraction", "limit", "runs", "mask_run", "time_limit",
         "base_params", "trials", "space", "objective", "pruner", "num_workers", "tensorboard", "audit"}
#: Pruner settings by name: a median pruner waits for this many finished trials and this share (%) of a run.
PRUNERS = {"median": {"kind": "median", "startup": 3, "warmup": 20}, "none": {"kind": "none"}}
#: Random trials before TPE models the space.
STARTUP_TRIALS = 5


# ------------------------------------------------------------------------------------------------ space
@dataclass(frozen=True)
class Dim:
    """One searched key: a range (``low``..``high``, log-scaled or stepped) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The trial's value for this key."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if int in params_mod.SCHEMA[self.key].types and float not in params_mod.SCHEMA[self.key].types:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def holds(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension (the baseline is enqueued only then)."""
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not self.low <= value <= self.high:
            return False
        return self.step is None or math.isclose((value - self.low) / self.step,
                                                 round((value - self.low) / self.step), abs_tol=1e-9)


def check_space(raw: Any, source: str) -> dict[str, Dim]:
    """A space from its YAML mapping, every key and bound checked against the params schema."""
    if not isinstance(raw, dict) or not raw:
        raise LungsError(f"{source}: a search space is a mapping of params keys to {{low, high}} or {{choices}}")
    space = {}
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if key in FIXED:
            raise LungsError(f"{where}: a sweep does not search '{key}' (it fixes where and what runs, and the films "
                             "trials are compared on); set it in the params file")
        params_mod.check_value(key, params_mod.SCHEMA[key].default if key in params_mod.SCHEMA else None, source)
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise LungsError(f"{where}: write {{low: .., high: ..}} (log: true, step: ..) or {{choices: [..]}}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise LungsError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; use low, high, log, step or "
                             "choices")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise LungsError(f"{where}: choices must be a non-empty list")
            checked = tuple(params_mod.check_value(key, c, where) for c in choices)
            if key == "model":
                from .. import models

                for name in checked:
                    models.options(name)
            space[key] = Dim(key, choices=checked)
            continue
        low, high = (params_mod.check_value(key, spec[b], f"{where}.{b}") for b in ("low", "high"))
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise LungsError(f"{where}: '{key}' is not a number; give choices: [..]")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if not low < high:
            raise LungsError(f"{where}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise LungsError(f"{where}: a log range needs low > 0")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
            raise LungsError(f"{where}: step must be a positive number, and not with log: true")
        space[key] = Dim(key, float(low), float(high), log, float(step) if step is not None else None)
    return space


def space_file(path: str | os.PathLike[str] | None) -> Path:
    """The search space's file: ``path`` itself, or a name under params/ (None: :data:`DEFAULT_SPACE`)."""
    found = Path(path) if path is not None and Path(path).is_file() else suite_path("params", str(path or DEFAULT_SPACE))
    if not found.is_file():
        raise LungsError(f"search space not found: {path}; give a YAML file (e.g. params/{DEFAULT_SPACE})")
    return found


def load_space(path: str | os.PathLike[str] | None) -> dict[str, Dim]:
    """The search space in ``path`` (a file, or a name under params/; None: :data:`DEFAULT_SPACE`)."""
    found = space_file(path)
    try:
        raw = yaml.safe_load(found.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LungsError(f"{found}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return check_space(raw, str(found))


def sample(trial: Any, space: Mapping[str, Dim]) -> dict[str, Any]:
    """The trial's recipe values. A start size at or above the image size means no progressive resizing."""
    values = {key: dim.suggest(trial) for key, dim in space.items()}
    size = values.get("image_size")
    if size is not None and values.get("start_size") and values["start_size"] >= size:
        values["start_size"] = None
    return values


# ------------------------------------------------------------------------------------------------ the study
@dataclass
class Settings:
    """What a sweep tunes and how (``sweep.json``): fixed by its first call, read back by the next ones."""

    base_params: str
    overrides: list[str]
    objective: str  # oof / val
    pruner: dict[str, Any]
    space: dict[str, Any]
    seed: int


def settings_for(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> Settings:
    """A sweep's settings from its params (``base_params``, ``space``, ``objective``, ``pruner``); ``overrides``
    go to every trial (``data_dir`` of the sweep too when set)."""
    base = runner.expand([values["base_params"]])[0] if values["base_params"] else None
    if base is None:
        raise LungsError("a sweep needs base_params: the params file of the recipe to tune")
    given = list(overrides) + ([f"data_dir={values['data_dir']}"] if values.get("data_dir") else [])
    recipe = runner.resolve(base, given)
    objective = values["objective"]
    if objective == "auto":
        objective = "oof" if recipe["cv"] else "val"
    if objective == "oof" and not recipe["cv"]:
        raise LungsError(f"objective oof needs a cross-validation recipe; {base.name} has cv: null: add -p cv=3, or "
                         "use --objective val")
    if objective == "val" and recipe["cv"]:
        given.append("cv=null")  # one validation split: the cheaper objective
    space = load_space(values["space"])
    return Settings(str(base.resolve()), given, objective, dict(PRUNERS[values["pruner"]]),
                    {k: asdict(d) for k, d in space.items()}, int(recipe["seed"]))


def _space(settings: Settings) -> dict[str, Dim]:
    return {k: Dim(**{**d, "choices": tuple(d["choices"]) if d["choices"] is not None else None})
            for k, d in settings.space.items()}


def open_study(folder: Path, settings: Settings | None = None) -> tuple[Any, Settings]:
    """The sweep's study and settings; with ``settings``, a new sweep's are written first, and a resumed
    sweep's must match them."""
    import optuna

    from .trial import make_pruner  # its callbacks need torch; commands that only bundle a sweep do not

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    saved_path = folder / SWEEP_FILE
    if saved_path.is_file():
        saved = Settings(**read_json(saved_path))
        if settings is not None and (saved.base_params, saved.space, saved.objective) != \
                (settings.base_params, settings.space, settings.objective):
            raise LungsError(f"sweep {folder.name} was started with other settings ({Path(saved.base_params).name}, "
                             f"objective {saved.objective}, {len(saved.space)} searched keys): run it with those to go on, "
                             "or choose another run_name (--name)")
        settings = saved
    elif settings is None:
        raise LungsError(f"{folder} holds no sweep ({SWEEP_FILE} is missing); start one with lungs sweep PARAMS")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, json.dumps(asdict(settings), indent=2))
    study = optuna.create_study(
        storage=storage_url(folder), study_name=folder.name, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=STARTUP_TRIALS),
        pruner=make_pruner(settings.pruner), load_if_exists=True)
    return study, settings


def _recover(study: Any) -> int:
    """Trials a killed sweep left running: each is closed as failed and asked again with the same values and
    run folder, which resumes from its last checkpoint. Returns how many."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        study.enqueue_trial(t.params, user_attrs={"run": t.user_attrs.get("run"), "resumes": t.number})
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(running)


def _counted(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def storage_url(folder: Path) -> str:
    """Where a sweep's study lives (``optuna-dashboard`` takes the same URL)."""
    return f"sqlite:///{(folder / STUDY_FILE).resolve()}"


@contextlib.contextmanager
def _trial_environment(folder: Path, study: Any, trial: Any, settings: Settings) -> Iterator[None]:
    """The variable that tells a trial's run which study and trial it reports to (:mod:`.trial`)."""
    from .trial import TRIAL_ENV

    old = os.environ.get(TRIAL_ENV)
    os.environ[TRIAL_ENV] = json.dumps({"storage": storage_url(folder), "study": study.study_name,
                                        "trial_id": trial._trial_id, "pruner": settings.pruner})
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRIAL_ENV, None)
        else:
            os.environ[TRIAL_ENV] = old


def _value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars are YAML scalars: null, true, 0.001, "resnet_tiny"


def run(values: Mapping[str, Any], folder: Path, overrides: Sequence[str] = (), *, say: Any = print) -> Any:
    """Run (or go on with) the sweep in ``folder`` until it has ``values['trials']`` finished trials or its
    ``time_limit`` (minutes from now) leaves too little for another; then write the ranking and the best
    recipe (:func:`finish`). Returns the Optuna study."""
    import optuna

    started = time.time()
    study, settings = open_study(folder, settings_for(values, overrides))
    space = _space(settings)
    resumed = _recover(study)
    counted = _counted(study)
    if not study.trials and all(d.holds(v) for d, v in
                                ((space[k], runner.resolve(settings.base_params, settings.overrides)[k]) for k in space)):
        base = runner.resolve(settings.base_params, settings.overrides)
        study.enqueue_trial({k: base[k] for k in space}, user_attrs={"baseline": True})
    say(f"sweep {folder.name}: {len(counted)} of {values['trials']} trials done"
        + (f", {resumed} interrupted trial(s) to resume" if resumed else "")
        + f"; objective {settings.objective} macro-F1; study in {folder / STUDY_FILE}")
    limit = values["time_limit"]
    while len(_counted(study)) < values["trials"]:
        left = None if limit is None else limit - (time.time() - started) / 60
        minutes = [t.user_attrs["minutes"] for t in _counted(study) if "minutes" in t.user_attrs]
        if left is not None and (left < 0.1 or (minutes and left < sorted(minutes)[len(minutes) // 2])):
            say(f"sweep {folder.name}: the time is up ({limit:g} min) with {len(_counted(study))} of {values['trials']} "
                "trials done; run the sweep again to go on")
            break
        trial = study.ask()
        chosen = sample(trial, space)
        name = trial.user_attrs.get("run") or f"{folder.name}-t{trial.number:03d}"
        trial.set_user_attr("run", name)
        trial_folder = folder.parent / name
        given = settings.overrides + [f"{k}={_value(v)}" for k, v in chosen.items()] + \
            [f"run_name={name}", f"output_dir={trial_folder}"] + ([f"time_limit={max(left, 0.1):.2f}"] if left else [])
        say(f"trial {trial.number} ({name}): " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
        t0 = time.perf_counter()
        with _trial_environment(folder, study, trial, settings):
            record = runner.execute(settings.base_params, given, say=say,
                                    on_exists="resume" if trial_folder.is_dir() and "resumes" in trial.user_attrs
                                    else "error")
        trial.set_user_attr("minutes", (time.perf_counter() - t0) / 60)
        cut = (read_json(trial_folder / METRICS_FILE).get("time_limit") or {}).get("cut") if record.ok else None
        if record.status == "pruned" or cut:
            trial.set_user_attr("pruned", record.error or f"the sweep's time ran out ({cut})")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            say(f"trial {trial.number}: pruned" + (f" ({record.error})" if record.error else " (time is up)"))
            if cut:
                break
        elif record.ok and record.val_macro_f1 is not None:
            study.tell(trial, record.val_macro_f1)
            say(f"trial {trial.number}: {settings.objective} macro-F1 {record.val_macro_f1:.4f} in "
                f"{trial.user_attrs['minutes']:.1f} min (best so far {study.best_value:.4f}, trial {study.best_trial.number})")
        else:
            trial.set_user_attr("error", record.error or "no score")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise LungsError(f"sweep {folder.name}: trial {trial.number} failed: {record.error}; fix it and run the "
                             "sweep again (it goes on with the next trial)")
    finish(folder, study, settings, say=say)
    return study


SWEEP_NOTEBOOK = "97_sweep.ipynb"


def is_sweep(values: Mapping[str, Any]) -> bool:
    """Whether these params run a sweep (its notebook) rather than one recipe."""
    return values.get("notebook") == SWEEP_NOTEBOOK


def recipe_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The params of one trial of the sweep ``values`` as the recipe gives them (what a trial costs)."""
    return runner.resolve(runner.expand([values["base_params"]])[0])


def bundle_files(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """What a Kaggle notebook of a sweep carries besides the package, and its params pointing at them: the
    recipe's params file (local paths dropped), the search space and the recipe's notebook, as
    ``params/...`` and ``notebooks/...`` beside the unpacked package, where :func:`suite_path` finds them."""
    base = runner.expand([values["base_params"]])[0]
    recipe = yaml.safe_load(base.read_text(encoding="utf-8")) or {}
    recipe.update({k: None for k in ("data_dir", "output_dir", "cache_dir") if recipe.get(k) is not None})
    space = space_file(values["space"])
    notebook = find_notebook(runner.resolve(base)["notebook"])
    files = {f"params/{base.name}": (f"# {base.name} as bundled for Kaggle (local paths dropped)\n"
                                     + yaml.safe_dump(recipe, sort_keys=False)).encode(),
             f"params/sweep/{space.name}": space.read_bytes(),
             f"notebooks/{notebook.name}": notebook.read_bytes()}
    return {**values, "base_params": base.name, "space": f"sweep/{space.name}"}, files


def sweep_values(params_file: str | os.PathLike[str], *, trials: int, minutes: float | None = None,
                 space: str | None = None, objective: str = "auto", pruner: str = "median",
                 name: str | None = None) -> dict[str, Any]:
    """The params of a sweep of ``params_file`` (what ``lungs sweep`` runs; the notebook's are the same keys):
    its folder is ``outputs/<name>`` (default ``<the recipe's run_name>-sweep``)."""
    base = runner.expand([params_file])[0]
    recipe = runner.resolve(base)
    return params_mod.load(overrides={"notebook": SWEEP_NOTEBOOK, "run_name": name or f"{recipe['run_name']}-sweep",
                                      "base_params": str(base), "trials": trials, "time_limit": minutes,
                                      "space": space, "objective": objective, "pruner": pruner})


def main(values: dict[str, Any], overrides: Sequence[str] = (), *, say: Any = print) -> Any:
    """``lungs sweep``: claim the sweep's folder (an existing sweep of that name goes on) and run it."""
    from .. import paths

    with paths.claimed(values, on_exists="resume") as (folder, _):
        return run(values, folder, overrides, say=say)


# ------------------------------------------------------------------------------------------------ results
def ranking(folder: Path, study: Any) -> pd.DataFrame:
    """The trials, best first: state, objective value with its 95 % interval, the paired gap to the best
    trial (same films) and its verdict, minutes, the searched values, and the run folder."""
    from ..analysis import leaderboard

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name.lower(), "run": t.user_attrs.get("run"),
                     "value": t.value, "minutes": t.user_attrs.get("minutes"),
                     "baseline": bool(t.user_attrs.get("baseline")), **{f"param.{k}": v for k, v in t.params.items()}})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    done = [folder.parent / r for r, s in zip(table["run"], table["state"]) if s == "complete" and r]
    board = leaderboard.gather(folders=done)
    keep = ["run", "val_f1_low", "val_f1_high", "vs_best", "gap_to_best", "gap_low", "gap_high"]
    table = table.merge(board[keep], on="run", how="left") if len(board) else table
    return table.sort_values(["value", "trial"], ascending=[False, True], na_position="last",
                             kind="stable").reset_index(drop=True)


def finish(folder: Path, study: Any, settings: Settings, *, say: Any = print) -> Path | None:
    """Write ``trials.csv`` and, once a trial completed, ``best.yaml`` (the best trial's recipe with its
    estimate); say the ranking. Returns the best recipe's path."""
    table = ranking(folder, study)
    atomic_write_csv(table, folder / TRIALS_FILE)
    complete = table[table["state"] == "complete"] if len(table) else table
    if complete.empty:
        say(f"sweep {folder.name}: no trial completed yet")
        return None
    best = study.best_trial
    values = runner.resolve(settings.base_params, settings.overrides + [f"{k}={_value(v)}" for k, v in
                                                                        sample(best, _space(settings)).items()])
    values.update(run_name=f"{Path(settings.base_params).stem}-best", output_dir=None, resume=False, overwrite=False,
                  time_limit=None)
    near = complete[complete["vs_best"].astype(str).eq(WITHIN_NOISE)]["trial"].tolist() \
        if "vs_best" in complete else []
    estimate = runner.estimate_line(values)  # on the films swept
    values.update(data_dir=None, cache_dir=None)  # a recipe discovers its data
    header = [(f"Best trial {best.number} of sweep {folder.name} ({settings.objective} macro-F1 {best.value:.4f}); "
               f"{len(complete)} trial(s) completed; within noise of it (paired): "
               f"{', '.join(map(str, near)) if near else 'none'}."),
              f"Made from {Path(settings.base_params).name} with the searched values: "
              + ", ".join(f"{k}={v}" for k, v in best.params.items()) + "."]
    said = baseline_line(table, best.number, Path(settings.base_params).name)
    if said:
        header.append(said)
    if estimate:
        header.append(f"Here, {estimate}.")
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(
        {k: v for k, v in values.items() if v != params_mod.SCHEMA[k].default or k in ("notebook", "run_name")},
        sort_keys=False)
    path = folder / BEST_FILE
    atomic_write_text(path, text)
    say(ranking_text(table))
    say(f"best recipe: {path} (lungs run {path})" + (f"; {estimate}" if estimate else ""))
    if said:
        say(said)
    return path


def baseline_line(table: pd.DataFrame, best: int, base_name: str) -> str | None:
    """What the study says of the recipe it started from (the trial enqueued as the baseline), against its best
    trial on the same films; None when the baseline did not complete. A study's best within noise of where it
    started has not shown that its changes pay: on held-out films such a "best" often scores lower."""
    if "baseline" not in table or "vs_best" not in table:
        return None
    rows = table[table["baseline"].astype(bool) & table["state"].eq("complete")]
    if rows.empty:
        return None
    row = rows.iloc[0]
    name = f"The base recipe as given ({base_name}, trial {int(row['trial'])})"
    if int(row["trial"]) == best:
        return f"{name} is the best trial: keep it."
    if row["vs_best"] == WITHIN_NOISE:
        return (f"{name} is within noise of the best (paired): this study does not show that the searched changes "
                f"pay; keep {base_name} unless a paired score on held-out films says otherwise.")
    return (f"{name} is behind the best by {-row['gap_to_best']:.3f} macro-F1 (95 % CI {-row['gap_high']:.3f} to "
            f"{-row['gap_low']:.3f}, paired): the searched changes pay on these films.")


def ranking_text(table: pd.DataFrame, top: int = 15) -> str:
    """The ranking as aligned text."""
    shown = table.head(top).copy()
    cols = ["trial", "state", "value", "val_f1_low", "val_f1_high", "vs_best", "minutes"]
    cols = [c for c in cols if c in shown] + [c for c in shown if c.startswith("param.")]
    shown = shown[cols].rename(columns=lambda c: c.removeprefix("param."))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def load(folder: str | os.PathLike[str]) -> Any:
    """A sweep's study, to look at (the notebook's plots; ``optuna-dashboard`` reads the same file)."""
    from ..paths import named_run

    return open_study(named_run(folder))[0]


def figures(study: Any) -> dict[str, Any]:
    """Optuna's matplotlib plots of the study as figures (for :func:`lungs_utils.stats.plots.show`): history,
    intermediate values (the pruner's view), parameter importances and slices; a plot that needs more
    completed trials than there are is a figure saying so."""
    import warnings

    import matplotlib.pyplot as plt
    import numpy as np
    import optuna
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as vis

    def figure(drawn: Any) -> Figure:
        fig = np.ravel(drawn)[0].figure
        plt.close(fig)  # shown once, by plots.show, not again by the inline backend
        return fig

    def note(text: str) -> Figure:
        fig = Figure(figsize=(6, 0.8))
        fig.text(0.01, 0.5, text, va="center", fontsize=10)
        return fig

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = sorted(k for k in {k for t in complete for k in t.params}
                    if len({repr(t.params.get(k)) for t in complete}) > 1)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        out["history"] = figure(vis.plot_optimization_history(study))
        out["intermediate values"] = figure(vis.plot_intermediate_values(study))
        if len(complete) >= 2 and varied:
            out["importances"] = figure(vis.plot_param_importances(study))
            out["slices"] = figure(vis.plot_slice(study, params=varied))
        else:
            out["importances"] = out["slices"] = note(
                f"parameter importances and slices need two completed trials with different values "
                f"({len(complete)} completed)")
    return out
