"""The training schedule's image sides (progressive resizing), torch-free: the training loop and the time
estimates (also Kaggle's, which must not import PyTorch) read the same sides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Progressive resizing reaches the full ``image_size`` after this share of the epochs.
RAMP_SHARE = 0.7
#: Training sizes are multiples of this (few distinct shapes: kernels and caches are reused).
SIZE_STEP = 16


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
