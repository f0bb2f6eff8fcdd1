"""Experiment parameters: one schema, YAML files in ``params/``, ``-p key=value`` overrides.

Params are plain data (no code). Every key is declared once in :data:`SCHEMA` with its type, default
and meaning; unknown keys and wrong types are errors that name the valid choices.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import LungsError


@dataclass(frozen=True)
class Spec:
    """One parameter: allowed types, default, optional choices and a one-line help."""

    types: tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None


def _s(types: type | tuple[type, ...], default: Any, help: str, **kw: Any) -> Spec:
    return Spec(types if isinstance(types, tuple) else (types,), default, help, **kw)


#: A run name is one plain folder name under outputs/ (``output_dir`` is the explicit way elsewhere).
RUN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,128}")

#: How a classifier uses a lung mask (key ``masks``; applied in :func:`lungs_utils.xrays.presets.apply_masks`).
MASK_MODES = ("none", "multiply", "crop", "channel")

#: Every parameter a params file or a notebook may set. Notebook defaults are quick CPU settings;
#: the full-size recipes live in ``params/*.yaml``.
SCHEMA: dict[str, Spec] = {
    # --- what to run ---------------------------------------------------------------------------
    "notebook": _s(str, "10_simple_cnn.ipynb", "notebook under notebooks/ that this run executes"),
    "run_name": _s(str, "run", "folder name under outputs/ for this run"),
    "data_dir": _s(str, None, "folder holding train_images/ (null = discover)", nullable=True),
    "output_dir": _s(str, None, "run folder (null = outputs/<run_name>)", nullable=True),
    # --- data ------------------------------------------------------------------------------------
    "image_size": _s(int, 256, "side of the square network input, pixels", minimum=16, maximum=1024),
    "start_size": _s(int, None, "progressive resizing: train the first epochs at this side, growing to "
                     "image_size over the first 70 % of the epochs (null = off); validation and test always "
                     "use image_size", nullable=True, minimum=16, maximum=1024),
    "val_fraction": _s(float, 0.2, "stratified validation share", minimum=0.01, maximum=0.9),
    "cv": _s(int, None, "k-fold cross-validation as one run, for classifiers and lung segmentation alike: "
             "train all k folds (each a sub-run in fold_<k>/) and predict every train image with the fold "
             "model that never saw it (out-of-fold); a classifier fits its temperature on those predictions "
             "and averages the fold models on the test set, a segmentation run writes every train image's "
             "out-of-fold mask (null = one train/validation split, val_fraction)", nullable=True, minimum=2,
             maximum=20),
    "limit": _s(int, None, "use only this many train images (stratified; quick runs)", nullable=True,
                minimum=3),
    "cache_dir": _s(str, None, "decoded-image cache folder (null = env LUNGS_CACHE_DIR, else data/cache)", nullable=True),
    "num_workers": _s(int, 0, "DataLoader worker processes", minimum=0),
    "histeq": _s(bool, False, "equalise each radiograph's histogram before anything else (evens out "
                 "exposure and contrast between X-ray machines; train, validation and test alike)"),
    "masks": _s(str, "none", "lung masks for a classifier: none, multiply (image x mask), crop (to the "
                "lungs' box) or channel (2nd input channel); train uses given masks, val/test predicted "
                "ones from mask_run", choices=MASK_MODES),
    "mask_run": _s(str, None, "segmentation run (name under outputs/ or folder) whose predicted masks "
                   "are used when masks is not none", nullable=True),
    "postprocess": _s(bool, True, "segmentation: clean predicted masks (two largest regions, holes filled; "
                      "an implausible mask is dropped, so classifiers use that image whole)"),
    # --- model and training ----------------------------------------------------------------------
    "model": _s(str, "simple_cnn", "architecture name from lungs_utils.models.names()"),
    "epochs": _s(int, 3, "training epochs", minimum=0),
    "batch_size": _s(int, 32, "training batch size", minimum=1),
    "seed": _s(int, 0, "seed for split, init, augmentation and loader order", minimum=0),
    "device": _s(str, "auto", "compute device", choices=("auto", "cpu", "cuda")),
    "optimizer": _s(str, "adamw", "optimizer", choices=("adamw", "adam", "sgd")),
    "lr": _s(float, 1e-3, "peak learning rate", minimum=0.0),
    "weight_decay": _s(float, 0.05, "decoupled weight decay", minimum=0.0),
    "momentum": _s(float, 0.9, "SGD (Nesterov) momentum", minimum=0.0, maximum=1.0),
    "scheduler": _s(str, "cosine", "learning-rate schedule", choices=("cosine", "onecycle", "none")),
    "warmup_epochs": _s(float, 1.0, "linear warm-up length (cosine)", minimum=0.0),
    "label_smoothing": _s(float, 0.0, "cross-entropy label smoothing", minimum=0.0, maximum=0.5),
    "class_weights": _s((str, list), "none", "loss class weights: none, balanced or [w0, w1, w2]"),
    "pseudo_labels": _s(str, None, "opt-in semi-supervised training: a finished run (name under outputs/ or folder) "
                        "whose test probabilities label the test films it is sure of (pseudo_threshold), added to "
                        "the training films; validation stays on labelled films. Uses the test images: check the "
                        "competition's rules (docs/pseudo-labels.md)", nullable=True),
    "pseudo_threshold": _s(float, 0.9, "pseudo_labels: a test film joins training when its top-class probability "
                           "in that run is at least this (0: every test film)", minimum=0.0, maximum=1.0),
    "grad_clip": _s(float, None, "clip gradient norm to this (null = off)", nullable=True, minimum=0.0),
    "precision": _s(str, "auto", "autocast precision (auto: bf16 on GPUs and bf16-capable CPUs, else fp32; "
                    "fp16 with a gradient scaler on older GPUs)",
                    choices=("auto", "fp32", "bf16", "fp16")),
    "channels_last": _s(bool, True, "use channels_last memory format"),
    "compile": _s(bool, False, "torch.compile the model"),
    "patience": _s(int, None, "early-stopping patience on val macro-F1, counted in validated epochs (null = off)",
                   nullable=True, minimum=1),
    "val_every": _s(int, 1, "validate every k-th epoch, and every epoch of the last quarter of the schedule (where "
                    "the best epoch lies; the last epoch always): fewer validation minutes, the same choice of the "
                    "best checkpoint", minimum=1, maximum=100),
    "ema": _s(float, 0.0, "exponential moving average of the weights, decay per training step (e.g. 0.998; "
              "0 = off): validation, the best checkpoint and predictions use the averaged weights, batch-norm "
              "statistics averaged alike", minimum=0.0, maximum=0.99999),
    "tensorboard": _s(bool, True, "write TensorBoard logs (losses, macro-F1, per-class F1, learning rate, "
                      "confusion matrix per epoch) to the run folder's tb/; `make tensorboard` shows outputs/"),
    "time_limit": _s(float, None, "minutes this run may take from its start: training stops at a clean point "
                     "in time to predict and write a submission from what it has (the folds that finished, else "
                     "the best checkpoint so far), recorded in metrics.json; SIGTERM does the same (null = no "
                     "limit; lungs kaggle-kernel sets one below Kaggle's)", nullable=True, minimum=0.1),
    "resume": _s(bool, False, "continue from checkpoints/last.pt of this run"),
    "overwrite": _s(bool, False, "replace a run already in this run's folder (otherwise it is refused: "
                    "resume it or choose another run_name)"),
    "distributed": _s(bool, False, "train with torchrun / DistributedDataParallel"),
    "nproc_per_node": _s(int, 1, "processes per node when distributed", minimum=1),
    # --- augmentation (each of the original project's nine flags has one here) --------------------
    "hflip": _s(float, 0.5, "horizontal-flip probability", minimum=0.0, maximum=1.0),
    "rotate": _s(float, 10.0, "max rotation, degrees", minimum=0.0, maximum=180.0),
    "translate": _s(float, 0.05, "max shift as image fraction", minimum=0.0, maximum=0.5),
    "scale": _s(float, 0.1, "max zoom in/out fraction", minimum=0.0, maximum=0.9),
    "brightness": _s(float, 0.2, "brightness jitter", minimum=0.0, maximum=1.0),
    "contrast": _s(float, 0.2, "contrast jitter", minimum=0.0, maximum=1.0),
    "equalize": _s(float, 0.0, "histogram-equalize probability", minimum=0.0, maximum=1.0),
    "sharpness": _s(float, 0.0, "random-sharpness probability", minimum=0.0, maximum=1.0),
    "invert": _s(float, 0.0, "invert probability", minimum=0.0, maximum=1.0),
    "frame": _s(float, 0.0, "probability of shrinking the film (to 55-90 % of the side) into a black frame "
                "at a random place, as small radiographs scanned on a larger film look", minimum=0.0,
                maximum=1.0),
    "crop_scale": _s(float, None, "random resized crop min area (null = off)", nullable=True,
                     minimum=0.05, maximum=1.0),
    "mixup": _s(float, 0.0, "mixup alpha (0 = off)", minimum=0.0),
    "cutmix": _s(float, 0.0, "cutmix alpha (0 = off)", minimum=0.0),
    # --- prediction ------------------------------------------------------------------------------
    "tta": _s(bool, False, "test-time augmentation: average the film, its mirror (left out when hflip is 0) and two small zooms"),
    "tune_decision": _s(bool, False, "shift the class boundaries to maximise validation macro-F1 (per-class "
                        "offsets; the cross-fitted gain is reported) and use them for the submission"),
    "calibrate": _s(bool, True, "fit one temperature on the validation predictions and save calibrated "
                    "probabilities (classes unchanged); false keeps the raw softmax"),
    "audit": _s(bool, True, "shortcut audit after predicting (needs lung masks): occlusion maps outside the "
                "chest, flagged when one cell's hot spot clears its simultaneous interval; Grad-CAM share inside "
                "the lungs, flagged when it lies wholly below half their area; macro-F1 with the lungs / the "
                "rest blanked, shown with intervals, never flagged"),
    # --- ensemble / leaderboard notebooks ---------------------------------------------------------
    "runs": _s(list, [], "run folders or run names to combine"),
    "ensemble_method": _s(str, "mean", "ensemble method: mean (measured best on real X-rays), weighted "
                          "(Caruana selection: its validation score is optimistic) or vote",
                          choices=("mean", "weighted", "vote")),
    # --- sweep (lungs sweep, 97_sweep.ipynb; time_limit is its budget) ----------------------------
    "base_params": _s(str, "cpu_small.yaml", "params file of the recipe a sweep tunes: each trial is a run of it "
                      "with the sampled values"),
    "trials": _s(int, 20, "trials a sweep runs in all (a resumed sweep counts those it has)", minimum=1,
                 maximum=1000),
    "space": _s(str, None, "search space of a sweep, a YAML file (null = params/sweep/cpu_space.yaml)",
                nullable=True),
    "objective": _s(str, "auto", "what a sweep maximises: oof (out-of-fold macro-F1 of a cv run), val (one "
                    "validation split) or auto (oof when the recipe has cv)", choices=("auto", "oof", "val")),
    "pruner": _s(str, "median", "a sweep's pruner: median (stop a trial whose validation macro-F1 falls below the "
                 "median of the finished trials at the same point of the run) or none", choices=("median", "none")),
}

#: Keys that were renamed or dropped: a file or -p that still uses one gets this line instead of "unknown key".
RENAMED: dict[str, str] = {
    "folds": "'folds' is now 'cv' (one key for classifiers and lung segmentation): write cv: {value}",
    "fold": "'fold' is gone: cv: k trains every fold in one run; for one train/validation split write cv: null "
            "and val_fraction",
}

#: The notebook of lung-segmentation runs (every other model notebook trains a classifier).
SEGMENTATION_NOTEBOOK = "05_lung_segmentation.ipynb"


def is_segmentation(params: Mapping[str, Any]) -> bool:
    """Whether these params describe a lung-segmentation run."""
    return params.get("notebook") == SEGMENTATION_NOTEBOOK


def defaults() -> dict[str, Any]:
    """A fresh dict of every parameter at its default."""
    return {k: (list(s.default) if isinstance(s.default, list) else s.default) for k, s in SCHEMA.items()}


_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(spec: Spec) -> str:
    names = {int: "integer", float: "number", bool: "true/false", str: "text", list: "list"}
    text = " or ".join(names[t] for t in spec.types)
    return text + (" or null" if spec.nullable else "")


def check_value(key: str, value: Any, source: str = "params") -> Any:
    """Validate one value against the schema; returns it (ints widened to float where a number is due)."""
    if key in RENAMED:
        raise LungsError(f"{source}: {RENAMED[key].format(value='null' if value is None else value)}")
    if key not in SCHEMA:
        hint = difflib.get_close_matches(key, SCHEMA, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise LungsError(
            f"{source}: unknown key '{key}'{did}; valid keys: {', '.join(sorted(SCHEMA))}"
        )
    spec = SCHEMA[key]
    if value is None:
        if spec.nullable:
            return None
        raise LungsError(f"{source}: '{key}' must be {_type_name(spec)}, got null")
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok and float in spec.types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok and float in spec.types and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-3 and 1.0e30 as text; everyone writes learning rates that way.
        value, ok = float(value), True
    if not ok:
        raise LungsError(
            f"{source}: '{key}' must be {_type_name(spec)}, got {value!r} ({type(value).__name__})"
        )
    if spec.choices is not None and value not in spec.choices:
        raise LungsError(
            f"{source}: '{key}' must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise LungsError(f"{source}: '{key}' must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise LungsError(f"{source}: '{key}' must be >= {spec.minimum}, got {value!r}")
        if spec.maximum is not None and value > spec.maximum:
            raise LungsError(f"{source}: '{key}' must be <= {spec.maximum}, got {value!r}")
    if key == "class_weights":
        _check_class_weights(value, source)
    if key == "run_name" and not RUN_NAME.fullmatch(value):
        raise LungsError(f"{source}: run_name {value!r} is not a plain name (letters, digits, '.', '_', '-'; "
                         "no '/' or '..'); a run folder lives in outputs/, and only output_dir may point "
                         "elsewhere, explicitly")
    return value


def _check_class_weights(value: Any, source: str) -> None:
    if isinstance(value, str):
        if value not in ("none", "balanced"):
            raise LungsError(f"{source}: 'class_weights' must be none, balanced or [w0, w1, w2], got {value!r}")
        return
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 0 for v in value):
        raise LungsError(f"{source}: 'class_weights' list needs 3 non-negative numbers, got {value!r}")


def validate(values: Mapping[str, Any], source: str = "params") -> dict[str, Any]:
    """Validate a partial mapping of params; returns a new dict of checked values."""
    return {k: check_value(k, v, source) for k, v in values.items()}


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a params file: a YAML mapping of known keys (validated, not yet merged with defaults)."""
    return validate(_mapping(path), source=str(path))


def _mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file's ``key: value`` mapping as written (one error line when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise LungsError(f"params file not found: {path} (see params/ for examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise LungsError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)}); "
                         "fix the file: params are 'key: value' lines") from None
    except UnicodeDecodeError:
        raise LungsError(f"{path}: not a text YAML file; params are 'key: value' lines") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LungsError(f"{path}: expected 'key: value' lines (a YAML mapping), got {type(data).__name__}")
    return data


def upgrade(values: Mapping[str, Any]) -> dict[str, Any]:
    """The params of a run folder written by an earlier version, in today's keys: a segmentation run's
    ``folds: k`` is ``cv: k``; a classifier's ``folds`` / ``fold`` (one fold of a k-fold assignment) was
    a single split, which its ``split.csv`` records."""
    values = dict(values)
    folds, _ = values.pop("folds", None), values.pop("fold", None)
    if folds and values.get("notebook") == SEGMENTATION_NOTEBOOK and not values.get("cv"):
        values["cv"] = folds
    return values


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (values are YAML scalars: ``epochs=5``, ``data_dir=null``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LungsError(f"-p {item!r}: expected key=value, e.g. -p epochs=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise LungsError(f"-p {item!r}: value is not a YAML scalar; quote text, e.g. -p run_name=x") from None
        out[key] = check_value(key, value, source=f"-p {key}")
    return out


def resolve(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in order (later wins); every layer is validated."""
    merged = defaults()
    for layer in layers:
        merged.update(validate(layer))
    return merged


def load(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
         ) -> dict[str, Any]:
    """Defaults ← params file ← overrides (``key=value`` strings or a mapping), all validated."""
    layers: list[Mapping[str, Any]] = []
    if path is not None:
        layers.append(read_yaml(path))
    layers.append(validate(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides))
    return resolve(*layers)


def load_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run folder's ``params.yaml`` (written by this or an earlier version: see :func:`upgrade`)."""
    values = defaults()
    values.update(validate(upgrade(_mapping(path)), source=str(path)))
    return values


def from_namespace(namespace: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    """Collect params from a notebook's globals (its ``parameters`` cell plus papermill's injections).

    Only schema keys are taken; everything else in the namespace is ignored, except a renamed key
    (:data:`RENAMED`), which says what to write instead. ``fixed`` values (e.g. the notebook's own name)
    override.
    """
    for key in RENAMED:
        if key in namespace:
            check_value(key, namespace[key], source="parameters cell")
    picked = {k: namespace[k] for k in SCHEMA if k in namespace}
    picked.update(fixed)
    return resolve(picked)


def dump(params: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write resolved params as YAML (atomically)."""
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(params), sort_keys=False))

