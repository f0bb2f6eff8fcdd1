"""The phantom dataset: layout, determinism, class balance, refusals, and that the pictures mean something."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungs_utils.xrays import phantom
from lungs_utils.errors import LungsError

SIZE = 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    summary = phantom.generate(out, n_train=24, n_test=9, size=SIZE, seed=3, workers=1)
    return out, summary


def test_layout_matches_the_competition(small):
    out, summary = small
    data = out / "data"
    assert summary["data_dir"] == str(data)
    assert sorted(os.listdir(out)) == ["PHANTOM.md", "data", "test_answers.csv"]  # no temp folders left behind
    assert sorted(os.listdir(data)) == ["test_images", "train_answers.csv", "train_images", "train_lung_masks"]

    train = pd.read_csv(data / "train_answers.csv")
    test = pd.read_csv(out / "test_answers.csv")
    for df, n in ((train, 24), (test, 9)):
        assert list(df.columns) == ["id", "target_feature"]
        assert len(df) == n
        assert df["id"].is_monotonic_increasing
        assert df.dtypes.tolist() == [np.int64, np.int64]
        assert set(df["target_feature"]) <= {0, 1, 2}
    assert set(train["id"]).isdisjoint(test["id"])
    assert set(train["id"]) | set(test["id"]) == set(range(33))

    def names(ids):
        return sorted(f"img_{i}.png" for i in ids)

    assert sorted(os.listdir(data / "train_images")) == names(train["id"])
    assert sorted(os.listdir(data / "train_lung_masks")) == names(train["id"])
    assert sorted(os.listdir(data / "test_images")) == names(test["id"])

    for i in train["id"]:
        img = Image.open(data / "train_images" / f"img_{i}.png")
        mask = Image.open(data / "train_lung_masks" / f"img_{i}.png")
        assert img.mode == "L" and img.size == (SIZE, SIZE)
        assert mask.mode == "L" and mask.size == (SIZE, SIZE)
        assert set(np.unique(np.asarray(mask))) == {0, 255}
    img = Image.open(data / "test_images" / f"img_{test['id'].iloc[0]}.png")
    assert img.mode == "L" and img.size == (SIZE, SIZE)

    assert summary["train"] == {k: int((train["target_feature"] == k).sum()) for k in range(3)}
    assert summary["test"] == {k: int((test["target_feature"] == k).sum()) for k in range(3)}
    assert summary["size"] == SIZE and summary["seed"] == 3 and summary["seconds"] >= 0


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, small):
    out, _ = small
    phantom.generate(tmp_path / "a", n_train=24, n_test=9, size=SIZE, seed=3, workers=2)
    assert _files(tmp_path / "a") == _files(out)

    phantom.generate(tmp_path / "b", n_train=24, n_test=9, size=SIZE, seed=4, workers=1)
    other = _files(tmp_path / "b")
    assert other.keys() != _files(out).keys() or other != _files(out)
    # Not just the ids: the pixels change too.
    assert {v for k, v in other.items() if k.endswith(".png")}.isdisjoint(
        {v for k, v in _files(out).items() if k.endswith(".png")}
    )


def test_class_counts_follow_the_weights(tmp_path):
    s = phantom.generate(tmp_path, n_train=20, n_test=10, size=16, class_weights=(2, 1, 1), workers=1)
    assert s["train"] == {0: 10, 1: 5, 2: 5}
    assert sum(s["test"].values()) == 10 and s["test"][0] == 5 and abs(s["test"][1] - s["test"][2]) == 1

    s = phantom.generate(tmp_path / "x", n_train=12, n_test=4, size=16, class_weights=(0, 1, 3), workers=1)
    assert s["train"] == {0: 0, 1: 3, 2: 9} and s["test"] == {0: 0, 1: 1, 2: 3}
    labels = pd.read_csv(tmp_path / "x" / "data" / "train_answers.csv")["target_feature"]
    assert labels.value_counts().to_dict() == {2: 9, 1: 3}


def test_refuses_to_overwrite_unless_asked(tmp_path):
    phantom.generate(tmp_path, n_train=3, n_test=2, size=16, seed=0, workers=1)
    before = _files(tmp_path)
    with pytest.raises(LungsError, match="already exists.*overwrite=True"):
        phantom.generate(tmp_path, n_train=3, n_test=2, size=16, seed=1, workers=1)
    assert _files(tmp_path) == before

    phantom.generate(tmp_path, n_train=4, n_test=2, size=16, seed=1, workers=1, overwrite=True)
    assert _files(tmp_path) != before
    assert len(pd.read_csv(tmp_path / "data" / "train_answers.csv")) == 4
    assert sorted(os.listdir(tmp_path)) == ["PHANTOM.md", "data", "test_answers.csv"]


def test_never_overwrites_what_may_be_real_data(tmp_path):
    (tmp_path / "data" / "train_images").mkdir(parents=True)  # a download: no test_answers.csv
    with pytest.raises(LungsError, match="real data"):
        phantom.generate(tmp_path, n_train=3, n_test=1, size=16, workers=1, overwrite=True)
    assert (tmp_path / "data" / "train_images").is_dir()


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(job)

    real = phantom._render_job
    monkeypatch.setattr(phantom, "_render_job", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        phantom.generate(tmp_path, n_train=5, n_test=2, size=16, workers=1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_train": 2.5}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"size": 8}, "size"),
        ({"size": 2048}, "size"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
        ({"class_weights": (1, 1)}, "class_weights"),
        ({"class_weights": (1, -1, 1)}, "class_weights"),
        ({"class_weights": (0, 0, 0)}, "class_weights"),
        ({"class_weights": ("a", 1, 1)}, "class_weights"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(LungsError) as err:
        phantom.generate(tmp_path / "out", **{"n_train": 3, "n_test": 1, "size": 16, **kwargs})
    assert str(err.value).startswith(name) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_render_checks_its_arguments():
    rng = np.random.default_rng(0)
    for kwargs, name in (({"label": 3}, "label"), ({"size": 4}, "size"), ({"severity": 1.5}, "severity")):
        with pytest.raises(LungsError, match=name):
            phantom.render(**{"label": 1, "size": 32, "rng": rng, **kwargs})


# --- content ------------------------------------------------------------------------------------
def _lower_outer_excess(img: np.ndarray, mask: np.ndarray) -> float:
    """Brightness of the lower, outer quarter of each lung, relative to that whole lung."""
    img = img.astype(np.float64)
    excess = []
    half = img.shape[1] // 2
    for cols, outer_is_left in ((slice(0, half), True), (slice(half, None), False)):
        lung = np.zeros_like(mask, dtype=bool)
        lung[:, cols] = mask[:, cols] > 0
        rows, columns = np.nonzero(lung)
        mid_r, mid_c = (rows.min() + rows.max()) / 2, (columns.min() + columns.max()) / 2
        rr, cc = np.indices(mask.shape)
        zone = lung & (rr > mid_r) & ((cc < mid_c) if outer_is_left else (cc > mid_c))
        excess.append(img[zone].mean() - img[lung].mean())
    return min(excess)  # COVID-19 is bilateral: both lungs should show it


def test_lung_masks_and_findings_are_plausible():
    size, n = 96, 30
    excess = {0: [], 2: []}
    for label in excess:
        for i in range(n):
            img, mask = phantom.render(label, size, np.random.default_rng([42, label, i]))
            assert img.dtype == np.uint8 and img.shape == (size, size) and mask.shape == (size, size)
            assert 0.15 <= (mask > 0).mean() <= 0.45
            excess[label].append(_lower_outer_excess(img, mask))
    # Bilateral lower-zone peripheral opacity: COVID-19 lungs are brighter there than normal ones.
    assert np.mean(excess[2]) > np.mean(excess[0]) + 5


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def test_findings_stay_inside_the_lungs():
    # Same generator state, finding switched off and on: everything else about the image is equal,
    # except for the exposure renormalisation, which is a monotone map of the whole picture.
    for label in (1, 2):
        for i in range(5):
            off, mask = phantom.render(label, 96, np.random.default_rng([7, label, i]), severity=0.0)
            on, _ = phantom.render(label, 96, np.random.default_rng([7, label, i]), severity=1.0)
            off, on = off.astype(float), on.astype(float)
            unclipped = (off > 0) & (off < 255) & (on > 0) & (on < 255)
            # The detector blur may carry a finding a pixel or two past the mask's edge, as it does
            # the lung's own edge.
            outside = ~_dilate(mask > 0, 3) & unclipped
            inside = (mask > 0) & unclipped
            coef = np.polyfit(off[outside], on[outside], 2)
            residual = np.abs(on[outside] - np.polyval(coef, off[outside]))
            assert residual.mean() < 1 and residual.max() < 6  # rounding, and gamma is not quite a parabola
            assert np.abs(on[inside] - np.polyval(coef, off[inside])).max() > 20  # a visible finding


def test_global_brightness_does_not_give_the_class_away():
    means = {
        label: [phantom.render(label, 48, np.random.default_rng([9, label, i]))[0].mean() / 255 for i in range(40)]
        for label in range(3)
    }
    overall = np.concatenate(list(means.values()))
    assert 0.42 < overall.mean() < 0.6
    spread = overall.std()
    for values in means.values():
        assert abs(np.mean(values) - overall.mean()) < spread  # class means sit well inside the spread


def test_phantom_data_is_reported_as_synthetic(tmp_path) -> None:
    from lungs_utils.xrays import data

    phantom.generate(tmp_path / "ph", n_train=6, n_test=2, size=32, seed=0)
    assert (tmp_path / "ph" / "PHANTOM.md").is_file()
    assert not (tmp_path / "ph" / "data" / "PHANTOM.md").exists()  # data/ keeps the competition layout
    assert data.load(tmp_path / "ph" / "data", progress=False).synthetic
