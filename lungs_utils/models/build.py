"""A run's network from its params: the one place that knows which model a run trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import LungsError
from ..params import is_segmentation
from .registry import build, names, options


def segmenter(name: str) -> nn.Module:
    """A registered model with a mask head, built mask-only (forward gives mask logits)."""
    if "mask_only" not in options(name):
        able = [n for n in names() if "mask_only" in options(n)]
        raise LungsError(f"model {name!r} has no mask head; for segmentation use one of: {', '.join(able)}")
    return build(name, mask_only=True)


def for_params(params: Mapping[str, Any]) -> nn.Module:
    """The network a run with these params trains, freshly initialised: a lung-segmentation run's mask-only
    model, or a classifier with a second input channel when the lung mask is fed as one (``masks: channel``)."""
    if is_segmentation(params):
        return segmenter(params["model"])
    return build(params["model"], in_channels=2 if params["masks"] == "channel" else 1)
