"""Shared fixtures: an isolated environment per test and tiny datasets in the competition layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the developer's data, caches, Kaggle mount or credentials."""
    home = tmp_path_factory.mktemp("lungs_home")
    (home / "params").mkdir()
    (home / "notebooks").mkdir()
    for var in ("LUNGS_DATA_DIR", "LUNGS_OUTPUTS", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN",
                "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LUNGS_HOME", str(home))
    monkeypatch.setenv("LUNGS_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("LUNGS_KAGGLE_INPUT", str(home / "no-kaggle-input"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return home


def write_dataset(root: Path, n_train: int = 12, n_test: int = 4, size: int = 32, masks: bool = True,
                  seed: int = 0) -> Path:
    """A tiny random dataset in the competition layout under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for sub in ("train_images", "test_images") + (("train_lung_masks",) if masks else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = rng.permutation(n_train + n_test) + 100
    labels = np.arange(n_train) % 3
    for i, label in zip(ids[:n_train], labels):
        img = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(img, "L").save(root / "train_images" / f"img_{i}.png")
        if masks:
            m = np.zeros((size, size), np.uint8)
            m[size // 4: 3 * size // 4, size // 8: 7 * size // 8] = 255
            Image.fromarray(m, "L").save(root / "train_lung_masks" / f"img_{i}.png")
    for i in ids[n_train:]:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(
            root / "test_images" / f"img_{i}.png")
    pd.DataFrame({"id": ids[:n_train], "target_feature": labels}).to_csv(root / "train_answers.csv",
                                                                          index=False)
    return root


def small_phantom(factory: pytest.TempPathFactory, name: str, n_train: int, seed: int) -> Path:
    """A phantom dataset of ``n_train`` / 6 films at 32 px for one test module; returns its data folder."""
    from lungs_utils.xrays import phantom

    root = factory.mktemp(name)
    phantom.generate(root / "ph", n_train=n_train, n_test=6, size=32, seed=seed, workers=1)
    return root / "ph" / "data"


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A writable 12-train / 4-test dataset at 32 px with masks."""
    return write_dataset(tmp_path / "data")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``folder``: used to assert nothing was written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cpu_settings(**kw: object) -> object:
    """Prediction settings on the CPU (:class:`lungs_utils.engine.predict.PredictSettings`); a lung-mask
    channel in the items is fed as a channel unless ``masks`` says otherwise."""
    import torch

    from lungs_utils.engine.predict import PredictSettings

    kw.setdefault("masks", "channel")
    return PredictSettings(device=torch.device("cpu"), **kw)  # type: ignore[arg-type]
