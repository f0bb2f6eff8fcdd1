"""The model registry: architectures are found by name, never by ``eval`` or module introspection.

Architecture modules decorate their builder functions with :func:`register`; everything else goes
through :func:`build`. A builder takes ``num_classes`` and ``in_channels`` (plus optional keyword
options of its own, e.g. ``dropout``) and returns a freshly initialised ``nn.Module``. No pretrained
weights anywhere: the competition requires training from scratch.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from ..errors import LungsError

if TYPE_CHECKING:  # pandas is imported lazily, only by summary_table
    import pandas as pd


class Builder(Protocol):
    def __call__(self, *, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module: ...


_REGISTRY: dict[str, Builder] = {}
_FIXED_ARGS = ("num_classes", "in_channels")


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make a builder ``(num_classes, in_channels, **options) -> nn.Module`` buildable by name."""

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            # Two architectures under one name would make results files ambiguous.
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise LungsError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None


def options(name: str) -> dict[str, Any]:
    """The extra keyword options a model accepts in :func:`build`, with their defaults."""
    params = inspect.signature(_builder(name)).parameters
    return {k: p.default for k, p in params.items() if k not in _FIXED_ARGS}


def build(name: str, num_classes: int = 3, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model by registry name.

    ``in_channels`` is 1 for grayscale X-rays, 2 when the lung mask is fed as an extra channel.
    ``kwargs`` are the model's own options (see :func:`options`); unknown ones raise ``LungsError``.
    """
    builder = _builder(name)
    if num_classes < 1 or in_channels < 1:
        raise LungsError(
            f"model {name!r} needs num_classes >= 1 and in_channels >= 1, got {num_classes} and {in_channels}"
        )
    unknown = sorted(set(kwargs) - set(options(name)))
    if unknown:
        valid = ", ".join(options(name)) or "none"
        raise LungsError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options: {valid}")
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _input_channels(model: nn.Module) -> int:
    # The first convolution registered is the stem in every model here.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 1


def describe(name_or_model: str | nn.Module, image_size: int = 256) -> dict[str, Any]:
    """Size and cost of a model: ``{"name", "params", "flops"}``.

    ``params`` counts every parameter. ``flops`` is the forward cost of ONE image of
    ``image_size`` x ``image_size`` (1 channel for a name, which builds the default 1-channel,
    3-class model; the model's own input channels for an instance), exactly as
    ``torch.utils.flop_counter.FlopCounterMode`` reports it: 2 FLOPs per multiply-accumulate, and
    only matmul/convolution-like ops (BatchNorm, activations and pooling are not counted).
    The model runs once in eval mode under ``no_grad``; its train/eval mode is restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(name_or_model, str):
        name, model = name_or_model, build(name_or_model)
    else:
        name, model = type(name_or_model).__name__, name_or_model
    first = next(model.parameters())
    x = torch.zeros(1, _input_channels(model), image_size, image_size, device=first.device, dtype=first.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": counter.get_total_flops(),
    }


def summary_table(image_size: int = 256) -> pd.DataFrame:
    """One row per registered model: name, params (M), GFLOPs (forward, one 1-channel image).

    GFLOPs follow :func:`describe` (FlopCounterMode: 2 FLOPs per multiply-accumulate).
    """
    import pandas as pd

    rows = []
    for name in names():
        d = describe(name, image_size=image_size)
        rows.append({"name": name, "params (M)": round(d["params"] / 1e6, 2), "GFLOPs": round(d["flops"] / 1e9, 2)})
    return pd.DataFrame(rows, columns=["name", "params (M)", "GFLOPs"])
