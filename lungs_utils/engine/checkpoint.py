"""Checkpoints: what ``checkpoints/last.pt`` and ``best.pt`` hold, written atomically and read back with
``weights_only=True``, and the random-number state that makes a resumed run replay the same batches."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import models
from ..errors import LungsError
from ..io import atomic_path

CHECKPOINT_FORMAT = "lungs-checkpoint-1"


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and the loop's own generators, as saved in ``last.pt``."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for key, g in generators.items():
        if key in state["generators"]:  # checkpoints of older versions lack newer generators
            g.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill leaves the old or the new file."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a lungs checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise LungsError(f"checkpoint {path} does not exist; train the run first or fix the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a checkpoint we can trust"
        raise LungsError(f"{path} is not a lungs checkpoint ({type(exc).__name__}); use "
                         "checkpoints/best.pt or last.pt from a run folder") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LungsError(f"{path} is not a lungs checkpoint (no '{CHECKPOINT_FORMAT}' marker); use "
                         "checkpoints/best.pt or last.pt from a run folder")
    return state


def check_resume(run_dir: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Before anything is written: refuse to resume a run whose ``last.pt`` is unreadable or holds
    another architecture (the run folder's params.yaml must keep describing its checkpoints)."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not params["resume"] or not last.is_file():
        return
    trained = load_checkpoint(last).get("params", {}).get("model")
    if trained is not None and trained != params["model"]:
        raise LungsError(f"{last} holds weights of '{trained}' that do not fit this model ('{params['model']}'); "
                         f"set model: {trained} or choose a checkpoint of this model")


def load_weights(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load model weights, turning an architecture mismatch into one actionable line."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as exc:
        trained = state.get("params", {}).get("model", "another architecture")
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise LungsError(f"{source} holds weights of '{trained}' that do not fit this model ({first[:120]}); "
                         f"set model: {trained} or choose a checkpoint of this model") from None


def load_model(params: Mapping[str, Any], checkpoint: str | os.PathLike[str], device: torch.device) -> nn.Module:
    """A trained network, the one way it is opened: built from its run's params (:func:`lungs_utils.models.
    for_params`), the checkpoint's weights loaded (an unreadable file or another architecture is one error
    line), on ``device`` in the memory format the run trained in."""
    model = models.for_params(params)
    load_weights(model, load_checkpoint(checkpoint, map_location=device), source=str(checkpoint))
    return model.to(device=device, memory_format=torch.channels_last if params["channels_last"]
                    else torch.preserve_format)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
