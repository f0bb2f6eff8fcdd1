"""A run's time budget: when training must end so that predicting still fits in ``time_limit``, and SIGTERM
(what Kaggle and batch schedulers send before they kill a process) as "the time is up now".

Either way the run stops training at a clean point — after an epoch, when the next one would end too late
(:class:`lungs_utils.engine.callbacks.Deadline`), or at once on SIGTERM, dropping the epoch in progress
(``last.pt`` holds the one before) — and goes on to predict with what it has: the folds that finished,
else the best checkpoint so far. ``metrics.json["time_limit"]`` says what was skipped, and a later
``resume`` trains the rest.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .estimate import Estimate

#: Why training stopped before its last epoch, besides patience and stop_after.
TIME_LIMIT, SIGTERM = "time_limit", "SIGTERM"
#: Kept free at the end of the budget, on top of the estimate of predicting and auditing: this share of
#: the budget, at most MARGIN_S seconds.
MARGIN_SHARE, MARGIN_S = 0.1, 60.0

_term = threading.Event()


class TimeUp(Exception):
    """Raised inside an epoch when SIGTERM came: the epoch in progress is dropped."""


def sigterm_received() -> bool:
    """Whether SIGTERM came while :func:`sigterm_stops_training` was in effect."""
    return _term.is_set()


@contextlib.contextmanager
def sigterm_stops_training() -> Iterator[None]:
    """While training: SIGTERM stops it at a clean point instead of killing the process (in the main
    thread only, where Python can take signals; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _term.clear()
    previous = signal.signal(signal.SIGTERM, lambda *_: _term.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def plan(params: Mapping[str, Any], estimate: Estimate | None, started: float) -> float | None:
    """With ``time_limit``: the wall-clock time (``time.time()``) training must end by, leaving the
    estimate's prediction and audit minutes and a margin before the limit; one warning line when the
    recipe's estimate does not fit. None without a limit."""
    if not params.get("time_limit"):
        return None
    end = started + params["time_limit"] * 60
    margin = min(MARGIN_S, MARGIN_SHARE * params["time_limit"] * 60)
    after = margin + (sum(estimate.parts.get(k, 0.0) for k in ("prediction", "audit")) if estimate else 0.0)
    train_by = end - after
    left = end - time.time()
    if estimate is not None and estimate.seconds > left:
        print(f"warning: time_limit {params['time_limit']:g} min: this recipe needs about {estimate.seconds / 60:.1f} "
              f"min here, {left / 60:.1f} are left; training stops at a clean point about "
              f"{max(0.0, train_by - time.time()) / 60:.1f} min from now and the run predicts with what it has "
              "(metrics.json says what was skipped; -p resume=true trains the rest later)", flush=True)
    return train_by
