"""Inside one trial of a sweep (:mod:`lungs_utils.runs.sweep`): report the run's learning curve to its Optuna
study and stop it when the pruner says it cannot catch up.

The sweep starts each trial as a normal run (``lungs run``: its notebook in a papermill kernel) with
:data:`TRIAL_ENV` set to where the study lives and which trial this is. :func:`callbacks` then gives every
part of the run a :class:`Report` callback: after each validated epoch it reports the validation score at
the run's progress in percent (a cross-validation run's folds one after the other, rounded to
:data:`STEP` so trials of different lengths report at the same steps) and, when the pruner says so, raises
``optuna.TrialPruned``: the run ends there (its checkpoints stay) and the sweep records the trial as pruned.
Without the variable (every ordinary run) there are no such callbacks and Optuna is never imported.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

from ..engine.callbacks import Callback

if TYPE_CHECKING:
    from ..engine.state import FitState

#: Environment variable naming the study and trial of a sweep trial: JSON {storage, study, trial_id, pruner}.
TRIAL_ENV = "LUNGS_TRIAL"
#: Reports are made at multiples of this many percent of the run.
STEP = 5

_trials: dict[str, Any] = {}


def make_pruner(spec: dict[str, Any]) -> Any:
    """The Optuna pruner a sweep's ``pruner`` spec names: ``{"kind": "median", "startup": n, "warmup": pct}``
    (a trial below the median of the finished trials at the same step is stopped, once ``startup`` trials
    finished and past ``warmup`` percent of the run), or ``{"kind": "none"}``."""
    import optuna

    if spec["kind"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec["startup"], n_warmup_steps=spec["warmup"])


def current() -> Any:
    """This process's Optuna trial (from :data:`TRIAL_ENV`), or None outside a sweep."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    if text not in _trials:
        import optuna

        given = json.loads(text)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=given["study"], storage=given["storage"],
                                  pruner=make_pruner(given["pruner"]))
        _trials[text] = optuna.trial.Trial(study, given["trial_id"])
    return _trials[text]


class Report(Callback):
    """Report each validated epoch's score to the trial; stop the run when the pruner says so."""

    def __init__(self, trial: Any, part: int, parts: int) -> None:
        self.trial, self.part, self.parts = trial, part, parts
        self.last_step = -1

    def step(self, s: FitState) -> int:
        """The run's progress in percent after this epoch, rounded down to a multiple of :data:`STEP`."""
        done = (self.part + s.epoch / max(1, s.params["epochs"])) / self.parts
        return math.floor(100 * done / STEP + 1e-9) * STEP

    def on_epoch_end(self, s: FitState) -> None:
        if not s.validated or s.rank != 0:
            return
        step = self.step(s)
        if step <= self.last_step:  # one report per step
            return
        self.last_step = step
        score = float(s.val_metrics[s.task.score])
        self.trial.report(score, step)
        # At 100 % the run has trained all it will: stopping it would save nothing and lose its result.
        if step < 100 and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at {step} % of its run (epoch {s.epoch}"
                                     f"{f' of fold {self.part}' if self.parts > 1 else ''}): val {s.task.score} "
                                     f"{score:.4f} is below the median of the finished trials there")


def callbacks(part: int, parts: int) -> list[Callback]:
    """The callbacks a part of a sweep trial adds to its training (none outside a sweep)."""
    trial = current()
    return [] if trial is None else [Report(trial, part, parts)]
