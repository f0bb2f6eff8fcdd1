"""The training schedule's image sides (progressive resizing), torch-free: the training loop and the time
estimates (also Kaggle's, which must not import PyTorch) read the same sides."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Progressive resizing reaches the full ``image_size`` after this share of the epochs.
RAMP_SHARE = 0.7
#: Training sizes are multiples of this (few distinct shapes: kernels and caches are reused).
SIZE_STEP = 16


#: With ``val_every`` > 1, every epoch of this last share of the schedule is still validated: with a decaying
#: learning rate the best epoch lies there, so the choice of the best checkpoint keeps its resolution.
VAL_LAST_SHARE = 0.25


def validates(params: Mapping[str, Any], epoch: int) -> bool:
    """Whether the epoch ending with 1-based ``epoch`` is validated: every ``val_every``-th epoch, and every
    epoch of the last :data:`VAL_LAST_SHARE` of the schedule (the last epoch always)."""
    every, epochs = params.get("val_every", 1) or 1, params["epochs"]
    return every <= 1 or epoch % every == 0 or epoch > epochs - max(1, math.ceil(VAL_LAST_SHARE * epochs))


def validated_epochs(params: Mapping[str, Any], done: int = 0) -> int:
    """How many of the epochs after ``done`` are validated (:func:`validates`): the time estimates count these."""
    return sum(validates(params, e) for e in range(done + 1, params["epochs"] + 1))


def train_size(params: Mapping[str, Any], epoch: int) -> int:
    """The training image side in ``epoch`` (0-based): ``image_size``, or with ``start_size`` a linear
    ramp from it to ``image_size`` over the first :data:`RAMP_SHARE` of the epochs, rounded down to a
    multiple of :data:`SIZE_STEP` (never below ``start_size``). Early epochs on smaller images cost less,
    so the same minutes buy more epochs (fast.ai's progressive resizing)."""
    full, start = params["image_size"], params["start_size"]
    if not start or start >= full:
        return full
    ramp = max(1.0, RAMP_SHARE * params["epochs"])
    size = start + (full - start) * min(1.0, epoch / ramp)
    return full if size >= full else max(start, int(size) // SIZE_STEP * SIZE_STEP)
