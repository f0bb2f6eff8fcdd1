"""Where things live: the project root, data discovery, cache and output folders.

Discovery order for the dataset folder (the one that holds ``train_images/``):
explicit ``data_dir`` → env ``LUNGS_DATA_DIR`` → a Kaggle input mount (``/kaggle/input/**/train_answers.csv``;
env ``LUNGS_KAGGLE_INPUT`` overrides the root) → the ``lungs download`` destination → the demo's phantom
data (with a warning that it is synthetic) → a clear error that says how to get data.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from .errors import DataWarning, LungsError

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_TEMP = Path("/kaggle/temp")


def project_root() -> Path:
    """The lungs checkout this code runs from (env ``LUNGS_HOME`` wins).

    Walks up from the working directory looking for the suite's ``params/`` + ``notebooks/`` pair,
    so notebooks opened from ``notebooks/`` and CLI calls from the top both land in the same place.
    Falls back to the working directory (e.g. on Kaggle).
    """
    env = os.environ.get("LUNGS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "notebooks").is_dir():
            return folder
    package_root = Path(__file__).resolve().parents[1]
    if (package_root / "params").is_dir() and (package_root / "notebooks").is_dir():
        return package_root
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else here


def download_dir() -> Path:
    """Where ``lungs download`` unpacks the competition zip (its ``data/`` folder lands inside)."""
    return project_root() / "data" / "competition"


def phantom_dir() -> Path:
    """Where ``lungs demo`` writes the phantom dataset (``data/phantom/data`` is the data dir)."""
    return project_root() / "data" / "phantom"


def outputs_dir() -> Path:
    """The folder holding one sub-folder per run."""
    env = os.environ.get("LUNGS_OUTPUTS")
    if env:
        return Path(env).expanduser().resolve()
    return project_root() / "outputs"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of the decoded-image caches: argument → env ``LUNGS_CACHE_DIR`` → Kaggle's scratch folder →
    ``data/cache`` under the project root."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("LUNGS_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if KAGGLE_TEMP.is_dir():
        # Not /kaggle/working: Kaggle keeps that folder as the notebook's output, and the cache is GBs.
        return KAGGLE_TEMP / "lungs_cache"
    return project_root() / "data" / "cache"


def dataset_cache_dir(data_dir: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """One cache folder per dataset folder, so two datasets never evict each other's cache."""
    data_dir = Path(data_dir).resolve()
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]
    slug = "-".join(p for p in (data_dir.parent.name, data_dir.name) if p)[-40:]
    return cache_root(cache_dir) / f"{slug}-{digest}"


def is_data_dir(path: Path) -> bool:
    """A folder in the competition layout (holds ``train_images/``)."""
    return (path / "train_images").is_dir()


def _kaggle_input_root() -> Path:
    return Path(os.environ.get("LUNGS_KAGGLE_INPUT", KAGGLE_INPUT))


def _from_kaggle_mount() -> Path | None:
    root = _kaggle_input_root()
    if not root.is_dir():
        return None
    # The mount layout has changed over the years (/kaggle/input/<slug>/data,
    # /kaggle/input/competitions/<slug>/..., ...): search for the answers file instead.
    hits = sorted(p.parent for p in root.rglob("train_answers.csv") if is_data_dir(p.parent))
    return hits[0] if hits else None


def _explicit(path: str | os.PathLike[str], source: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise LungsError(f"{source}: data folder {folder} does not exist; point it at the folder "
                         "that holds train_images/ (or run `lungs download` / `lungs phantom OUT`)")
    if is_data_dir(folder):
        return folder
    if is_data_dir(folder / "data"):
        # People often point at the unzipped archive, whose data/ holds the images.
        return folder / "data"
    raise LungsError(f"{source}: {folder} has no train_images/ folder; point it at the folder that "
                     "holds train_images/, test_images/ and train_answers.csv")


def find_data_dir(data_dir: str | os.PathLike[str] | None = None, *, allow_phantom: bool = True) -> Path:
    """Locate the dataset folder (see module docstring for the order)."""
    if data_dir is not None:
        return _explicit(data_dir, "data_dir")
    env = os.environ.get("LUNGS_DATA_DIR")
    if env:
        return _explicit(env, "LUNGS_DATA_DIR")
    found = _from_kaggle_mount()
    if found is not None:
        return found
    for candidate in (download_dir() / "data", download_dir()):
        if is_data_dir(candidate):
            return candidate
    phantom = phantom_dir() / "data"
    if allow_phantom and is_data_dir(phantom):
        warnings.warn(f"using the SYNTHETIC phantom dataset at {phantom} (no real data found): "
                      "results say nothing about real X-rays; run `lungs download` for the "
                      "competition data", DataWarning, stacklevel=2)
        return phantom
    raise LungsError("no dataset found: run `lungs download` (needs Kaggle credentials) or "
                     "`lungs phantom data/phantom` for synthetic data, or set data_dir / LUNGS_DATA_DIR "
                     "to the folder that holds train_images/")
