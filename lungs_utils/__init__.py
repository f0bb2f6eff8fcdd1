"""lungs_utils — helpers shared by the lungs notebook suite.

The package is built in layers, bottom first (:data:`LAYERS`); a module imports from its own part and
from the parts of lower layers only, at the top of the file or inside a function alike (a test walks
every import). docs/design.md draws the map.

Importing this package has no side effects (no device selection, no downloads, no Kaggle auth, no
PyTorch): the notebooks' short names (``from lungs_utils import experiment, plots``) are loaded when
first used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

from .errors import DataWarning, LungsError  # noqa: E402 - after __version__, which errors does not need

CLASS_NAMES: tuple[str, ...] = ("normal", "other disease", "COVID-19")
NUM_CLASSES: int = len(CLASS_NAMES)
COMPETITION: str = "ml-intensive-yandex-academy-spring-2024"

#: The parts of the package, bottom layer first. ``base`` is the modules at the top of the package
#: (errors, io, progress, hardware, params, paths, runfolder: no PyTorch). A part may import its own
#: modules and those of the parts in lower layers; two parts of one layer know nothing of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("base",),
    ("xrays", "models"),  # the films; the networks
    ("stats",),  # metrics, intervals, calibration, decisions, figures
    ("engine",),  # device, tasks, the loop, checkpoints, inference, prediction, estimate
    ("analysis",),  # audit, Grad-CAM, ensembles, leaderboard, report, lungs predict
    ("runs",),  # classification and segmentation runs, papermill runner, torchrun launcher
    ("competition",),  # Kaggle API, Kaggle notebooks
    ("app",),  # the lungs command, the demo, the 96_explore widget
)

#: The modules the notebooks import by a short name (``from lungs_utils import experiment``): a stable
#: part of the notebook API, loaded on first use.
NOTEBOOK_MODULES: dict[str, str] = {
    "data": "xrays.data", "plots": "stats.plots", "experiment": "runs.experiment",
    "segmentation": "runs.segmentation", "gradcam": "analysis.gradcam", "report": "analysis.report",
    "ensemble": "analysis.ensemble", "leaderboard": "analysis.leaderboard", "explore": "app.explore",
    "sweep": "runs.sweep",
    "cli": "app.cli",  # console scripts installed before the move call lungs_utils.cli:main
}
#: Modules that moved into a part: the old name still imports them, with one line saying what to write.
MOVED: dict[str, str] = {
    "layout": "xrays.layout", "cache": "xrays.cache", "polarity": "xrays.polarity", "phantom": "xrays.phantom",
    "presets": "xrays.presets", "submission": "xrays.submission",
    "metrics": "stats.metrics", "bootstrap": "stats.bootstrap", "calibration": "stats.calibration",
    "decision": "stats.decision",
    "train": "engine.loop", "callbacks": "engine.callbacks", "checkpoint": "engine.checkpoint",
    "inference": "engine.inference", "predict": "engine.predict", "estimate": "engine.estimate",
    "schedule": "engine.schedule", "distributed": "engine.distributed",
    "audit": "analysis.audit", "apply": "analysis.apply", "runner": "runs.runner",
    "kaggle": "competition.kaggle", "bundle": "competition.bundle", "demo": "app.demo",
}


def _resolve(name: str) -> ModuleType:
    """The module an old or notebook short name stands for (imported now)."""
    where = NOTEBOOK_MODULES.get(name) or MOVED[name]
    if name in MOVED:
        warnings.warn(f"lungs_utils.{name} is now lungs_utils.{where}: import it from there "
                      f"(from lungs_utils.{where.rpartition('.')[0]} import {where.rpartition('.')[2]})",
                      DeprecationWarning, stacklevel=3)
    return importlib.import_module(f"{__name__}.{where}")


def __getattr__(name: str) -> Any:
    # `from lungs_utils import experiment` and `lungs_utils.plots` on first use.
    if name in NOTEBOOK_MODULES or name in MOVED:
        return _resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import lungs_utils.data`` / ``from lungs_utils.train import fit``: the dotted forms of the short
    names above resolve to the one module object (no second copy of any module)."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        package, _, name = fullname.partition(".")
        if package != __name__ or "." in name or (name not in NOTEBOOK_MODULES and name not in MOVED):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        module = _resolve(spec.name.partition(".")[2])
        self._specs[id(module)] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the module: give it back its own.
        module.__spec__ = self._specs.pop(id(module))


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.insert(0, _ShortNames())

__all__ = ["CLASS_NAMES", "COMPETITION", "LAYERS", "NUM_CLASSES", "DataWarning", "LungsError", "__version__"]
