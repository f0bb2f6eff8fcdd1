"""Data layer: discovery order, validation errors, decode-once cache, splits and the Dataset."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import snapshot, write_dataset
from lungs_utils.xrays import data as D
from lungs_utils import paths
from lungs_utils.errors import DataWarning, LungsError


# ----------------------------------------------------------------------------------------------- discovery
def test_explicit_dir_wins_over_env(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = write_dataset(tmp_path / "other")
    monkeypatch.setenv("LUNGS_DATA_DIR", str(other))
    assert paths.find_data_dir(tiny_data) == tiny_data.resolve()
    assert paths.find_data_dir() == other.resolve()


def test_explicit_parent_of_data_is_accepted(tmp_path: Path) -> None:
    write_dataset(tmp_path / "zip_root" / "data")
    assert paths.find_data_dir(tmp_path / "zip_root") == (tmp_path / "zip_root" / "data").resolve()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_explicit_dir_without_layout_is_an_error(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "nowhere"
    if make == "empty":
        folder.mkdir()
    with pytest.raises(LungsError, match="train_images") as exc:
        paths.find_data_dir(folder)
    assert str(folder) in str(exc.value)


def test_discovery_order(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = isolated_env
    # Nothing anywhere: the error says how to get data.
    with pytest.raises(LungsError, match=r"lungs download.*lungs phantom"):
        paths.find_data_dir()
    # Phantom data of the demo is the last resort, with a visible warning.
    phantom = write_dataset(home / "data" / "phantom" / "data")
    with pytest.warns(DataWarning, match="SYNTHETIC"):
        assert paths.find_data_dir() == phantom
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process: a pipeline of runs finds it once per run
        assert paths.find_data_dir() == phantom
    with pytest.raises(LungsError):
        paths.find_data_dir(allow_phantom=False)
    # The `lungs download` destination beats the phantom.
    downloaded = write_dataset(home / "data" / "competition" / "data")
    assert paths.find_data_dir() == downloaded
    # A Kaggle input mount (any depth) beats the download destination.
    mount = tmp_path / "kaggle_input"
    kaggle = write_dataset(mount / "competitions" / "ml-intensive-yandex-academy-spring-2024" / "data")
    monkeypatch.setenv("LUNGS_KAGGLE_INPUT", str(mount))
    assert paths.find_data_dir() == kaggle
    # The environment variable beats the mount; an explicit folder beats everything.
    env = write_dataset(tmp_path / "env")
    monkeypatch.setenv("LUNGS_DATA_DIR", str(env))
    assert paths.find_data_dir() == env.resolve()
    assert paths.find_data_dir(phantom) == phantom.resolve()


def test_project_root_found_from_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUNGS_HOME")
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert paths.project_root() == tmp_path.resolve()


# ----------------------------------------------------------------------------------------------- validation
def _answers(folder: Path, text: str) -> None:
    (folder / "train_answers.csv").write_text(text)


def _first_rows(folder: Path) -> list[str]:
    return (folder / "train_answers.csv").read_text().splitlines()


BAD_ANSWERS = {
    "missing": (None, "train_answers.csv is missing"),
    "empty": ("", "is empty"),
    "header_only": ("id,target_feature\n", "has a header but no rows"),
    "no_id": ("image,target_feature\n1,0\n", "missing column.*id"),
    "no_target": ("id,label\n1,0\n", "missing column.*target_feature"),
    "non_integer_id": ("id,target_feature\n{a},0\nabc,1\n", r"line 3: id 'abc' is not a non-negative integer"),
    "duplicate_id": ("id,target_feature\n{a},0\n{a},1\n", r"line 3: id \d+ is a duplicate of line 2"),
    "label_outside": ("id,target_feature\n{a},0\n{b},3\n", r"line 3: label '3' is outside"),
    "label_text": ("id,target_feature\n{a},covid\n", r"line 2: label 'covid' is not 0, 1 or 2"),
    "id_without_image": ("id,target_feature\n{a},0\n999999,1\n", r"line 3: id 999999 has no image .*img_999999.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_bad_answers_file_is_one_clear_line_and_writes_nothing(tiny_data: Path, isolated_env: Path,
                                                               case: str) -> None:
    text, pattern = BAD_ANSWERS[case]
    a, b = [line.split(",")[0] for line in _first_rows(tiny_data)[1:3]]
    if text is None:
        (tiny_data / "train_answers.csv").unlink()
    else:
        _answers(tiny_data, text.format(a=a, b=b))
    before = snapshot(isolated_env / "cache")
    with pytest.raises(LungsError, match=pattern) as exc:
        D.load(tiny_data, progress=False)
    message = str(exc.value)
    assert "\n" not in message and "train_answers.csv" in message
    assert snapshot(isolated_env / "cache") == before


def test_no_train_images_at_all(tiny_data: Path) -> None:
    for p in (tiny_data / "train_images").iterdir():
        p.unlink()
    with pytest.raises(LungsError, match="holds no img_<id>.png"):
        D.load(tiny_data, progress=False)


def test_train_and_test_ids_may_overlap(tiny_data: Path) -> None:
    # Train and test ids are separate numberings (real-dev's both start at 0).
    some = next((tiny_data / "train_images").iterdir())
    shutil.copy(some, tiny_data / "test_images" / some.name)
    data = D.load(tiny_data, progress=False)
    assert int(some.stem.split("_")[1]) in set(data.test.ids) & set(data.train.ids)


def _some_train_image(folder: Path) -> Path:
    return sorted((folder / "train_images").iterdir())[-1]


def _no_cache_files(cache: Path) -> bool:
    return not any(cache.rglob("*.npy")) and not any(cache.rglob("*.tmp"))


def test_truncated_png_is_refused_and_no_cache_is_left(tiny_data: Path, isolated_env: Path) -> None:
    victim = _some_train_image(tiny_data)
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(LungsError, match=rf"{victim.name}: cannot decode image.*re-download"):
        D.load(tiny_data, progress=False)
    assert _no_cache_files(isolated_env / "cache")


def test_garbage_file_is_refused(tiny_data: Path) -> None:
    victim = _some_train_image(tiny_data)
    victim.write_bytes(b"not an image at all")
    with pytest.raises(LungsError, match="cannot decode image"):
        D.load(tiny_data, progress=False)


def test_jpeg_named_png_is_read_with_a_warning(tiny_data: Path) -> None:
    victim = _some_train_image(tiny_data)
    pixels = np.full((32, 32), 77, np.uint8)
    Image.fromarray(pixels, "L").save(victim, format="JPEG", quality=100)
    with pytest.warns(DataWarning, match="JPEG content"):
        data = D.load(tiny_data, progress=False)
    row = int(np.flatnonzero(data.train.ids == int(victim.stem.split("_")[1]))[0])
    assert abs(int(data.train.images[row].mean()) - 77) <= 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_images_are_converted_to_grayscale_with_a_warning(tiny_data: Path, mode: str) -> None:
    victim = _some_train_image(tiny_data)
    rgb = np.zeros((32, 32, len(mode)), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    if mode == "RGBA":
        rgb[..., 3] = 255
    Image.fromarray(rgb, mode).save(victim)
    with pytest.warns(DataWarning, match=f"{mode} converted to grayscale"):
        data = D.load(tiny_data, progress=False)
    row = int(np.flatnonzero(data.train.ids == int(victim.stem.split("_")[1]))[0])
    # ITU-R 601 luma, what PIL's convert("L") computes: not channel 0, not a mean.
    expected = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
    assert abs(int(data.train.images[row, 0, 0]) - expected) <= 1


def test_sixteen_bit_images_are_scaled_to_eight_bit(tiny_data: Path) -> None:
    victim = _some_train_image(tiny_data)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(victim)
    with pytest.warns(DataWarning, match="16-bit scaled"):
        data = D.load(tiny_data, progress=False)
    row = int(np.flatnonzero(data.train.ids == int(victim.stem.split("_")[1]))[0])
    assert int(data.train.images[row, 5, 5]) == round(40000 * 255 / 65535)


def test_mixed_sizes_are_resized_to_the_common_size_with_a_warning(tiny_data: Path) -> None:
    victim = _some_train_image(tiny_data)
    Image.fromarray(np.full((48, 40), 120, np.uint8), "L").save(victim)
    with pytest.warns(DataWarning, match="resized to 32x32"):
        data = D.load(tiny_data, progress=False)
    assert data.train.images.shape[1:] == (32, 32)


def test_masks_of_the_wrong_size_are_resized_and_stay_binary(tiny_data: Path) -> None:
    mask = sorted((tiny_data / "train_lung_masks").iterdir())[0]
    m = np.zeros((64, 64), np.uint8)
    m[10:50, 10:50] = 255
    Image.fromarray(m, "L").save(mask)
    with pytest.warns(DataWarning, match="masks image"):
        data = D.load(tiny_data, progress=False)
    assert data.masks is not None and data.masks.images.shape == data.train.images.shape
    assert set(np.unique(data.masks.images)) <= {0, 255}


# ----------------------------------------------------------------------------------------------- cache
def test_cache_is_built_once_then_memory_mapped(tiny_data: Path, isolated_env: Path) -> None:
    first = D.load(tiny_data, progress=False)
    assert isinstance(first.train.images, np.memmap)
    assert first.train.images.dtype == np.uint8 and first.train.images.shape == (12, 32, 32)
    stamp = first.train.path.stat().st_mtime_ns
    second = D.load(tiny_data, progress=False)
    assert second.train.path == first.train.path and second.train.path.stat().st_mtime_ns == stamp
    # Pixel-exact against a direct PIL decode, in id order.
    some_id = int(first.train.ids[3])
    direct = np.asarray(Image.open(tiny_data / "train_images" / f"img_{some_id}.png"))
    np.testing.assert_array_equal(first.train.images[3], direct)
    assert first.test.images.shape == (4, 32, 32) and first.masks is not None


def test_cache_is_invalidated_when_an_image_changes(tiny_data: Path) -> None:
    first = D.load(tiny_data, progress=False)
    old_path = first.train.path
    victim = tiny_data / "train_images" / f"img_{int(first.train.ids[0])}.png"
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(victim)
    os.utime(victim, ns=(1, 1))  # new mtime even on coarse file systems
    second = D.load(tiny_data, progress=False)
    assert second.train.path != old_path and not old_path.exists()
    assert second.train.images[0].max() == 0


def test_cache_is_invalidated_when_the_file_list_changes(tiny_data: Path) -> None:
    first = D.load(tiny_data, progress=False)
    extra = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    Image.fromarray(extra, "L").save(tiny_data / "test_images" / "img_5000.png")
    second = D.load(tiny_data, progress=False)
    assert second.test.path != first.test.path and len(second.test) == len(first.test) + 1
    assert second.train.path == first.train.path


def test_no_disk_space_for_the_cache(tiny_data: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungs_utils.xrays import cache

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(LungsError, match="not enough disk space.*LUNGS_CACHE_DIR"):
        D.load(tiny_data, progress=False)
    assert _no_cache_files(isolated_env / "cache")


def test_cache_works_on_a_read_only_dataset(tiny_data: Path) -> None:
    # Kaggle mounts the data read-only: the cache must live elsewhere.
    for p in [tiny_data, *tiny_data.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        data = D.load(tiny_data, progress=False)
        assert not data.train.path.is_relative_to(tiny_data)
    finally:
        for p in [tiny_data, *tiny_data.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


# ----------------------------------------------------------------------------------------------- splits
def _labels(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.arange(n) * 7 + 3, "target_feature": rng.choice(3, n, p=[0.5, 0.3, 0.2])})


def test_split_is_stratified_and_deterministic() -> None:
    labels = _labels()
    a = D.make_split(labels, 0.2, seed=1).table
    b = D.make_split(labels, 0.2, seed=1).table
    c = D.make_split(labels, 0.2, seed=2).table
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    val = a[a["split"] == "val"]
    assert len(val) == 60
    share = labels["target_feature"].value_counts(normalize=True)
    for cls, n in val["target_feature"].value_counts().items():
        assert abs(n - 60 * share[cls]) <= 1
    assert set(a["id"]) == set(labels["id"])


def test_kfold_assignment_covers_every_id_once() -> None:
    labels = _labels()
    split = D.make_split(labels, seed=0, cv=5)
    folds = split.table
    assert split.k == 5 and split.parts == 5 and sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    part = split.part(2)
    assert (folds.loc[part["split"] == "val", "fold"] == 2).all() and (folds.loc[part["split"] == "train", "fold"] != 2).all()
    np.testing.assert_array_equal(split.fold_of(folds["id"].to_numpy()[::-1]), folds["fold"].to_numpy()[::-1])
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    per_class = folds.groupby(["fold", "target_feature"]).size().unstack()
    assert (per_class.max() - per_class.min()).max() <= 1
    with pytest.raises(IndexError, match="part 5 of a 5-fold split"):
        split.part(5)
    with pytest.raises(LungsError, match="cv: 5 needs at least 5 images of every class"):
        D.make_split(labels.iloc[:12], cv=5)


def test_limit_keeps_a_stratified_subset() -> None:
    labels = _labels()
    small = D.make_split(labels, 0.25, seed=0, limit=40).table
    assert len(small) == 40 and (small["split"] == "val").sum() == 10
    assert small["target_feature"].nunique() == 3


def test_split_is_saved_and_reused(tiny_data: Path) -> None:
    data = D.load(tiny_data, progress=False)
    split = D.split_for(data, 0.25, seed=3).table
    saved = list((data.cache_dir / "splits").glob("*.csv"))
    assert len(saved) == 1
    pd.testing.assert_frame_equal(pd.read_csv(saved[0]), split)
    stamp = saved[0].stat().st_mtime_ns
    again = D.split_for(data, 0.25, seed=3).table
    pd.testing.assert_frame_equal(again, split)
    assert saved[0].stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------------- Dataset
def test_dataset_items_and_batches(tiny_data: Path) -> None:
    data = D.load(tiny_data, progress=False)
    split = D.split_for(data, 0.25, seed=0)
    train, val, test = D.datasets(data, split.part(0))
    assert len(train) + len(val) == 12 and len(test) == 4
    x, y, i = train[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 32, 32) and y in (0, 1, 2)
    row = int(np.flatnonzero(data.train.ids == i)[0])
    np.testing.assert_array_equal(x[0].numpy(), data.train.images[row])
    _, y_test, _ = test[0]
    assert y_test == -1
    loader = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False)
    xs, ys, ids = next(iter(loader))
    assert xs.shape == (2, 1, 32, 32) and ys.dtype == torch.int64
    assert ids.tolist() == val.ids[:2].tolist()
    batch = val.__getitems__([2, 0, 1])
    for (bx, by, bi), k in zip(batch, [2, 0, 1]):
        sx, sy, si = val[k]
        assert torch.equal(bx, sx) and by == sy and bi == si


def test_dataset_with_masks_has_two_channels(tiny_data: Path) -> None:
    data = D.load(tiny_data, progress=False)
    split = D.split_for(data)
    train, _, _ = D.datasets(data, split.part(0), use_masks=True)
    x, _, _ = train[0]
    assert x.shape == (2, 32, 32) and set(x[1].unique().tolist()) <= {0, 255}


def test_masks_requested_but_absent(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "nomask", masks=False)
    data = D.load(folder, progress=False)
    assert data.masks is None
    with pytest.raises(LungsError, match="train_lung_masks is missing"):
        D.datasets(data, D.split_for(data).part(0), use_masks=True)


def test_per_item_transform_is_applied(tiny_data: Path) -> None:
    from torchvision.transforms import v2

    data = D.load(tiny_data, progress=False)
    ds = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"],
                       transform=v2.Resize((16, 16), antialias=True))
    assert ds[0][0].shape == (1, 16, 16)
    assert ds.__getitems__([0, 1])[1][0].shape == (1, 16, 16)


# ----------------------------------------------------------------------------------------------- killed builds
def _temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def test_temp_of_a_build_killed_with_sigkill_is_removed_by_the_next_build(tiny_data: Path,
                                                                          isolated_env: Path) -> None:
    victim = _some_train_image(tiny_data)
    started = isolated_env / "decoding-started"
    # A child process builds the cache and blocks while decoding one image; kill -9 leaves its temp.
    script = textwrap.dedent(f"""
        import pathlib, time
        from lungs_utils.xrays import cache
        from lungs_utils.xrays import data
        real = cache.decode
        def slow(path, *args, **kwargs):
            if pathlib.Path(path).name == {victim.name!r}:
                pathlib.Path({str(started)!r}).touch()
                time.sleep(600)
            return real(path, *args, **kwargs)
        cache.decode = slow
        data.load({str(tiny_data)!r}, progress=False, workers=1)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child build did not start"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL: no finally clause of the child runs
        child.wait()
    left = _temps(isolated_env / "cache")
    assert left and all(".train-" in p.name for p in left)
    data = D.load(tiny_data, progress=False)
    assert _temps(isolated_env / "cache") == []
    assert data.train.images.shape == (12, 32, 32)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_are_removed_but_a_live_writers_temp_is_kept(tiny_data: Path) -> None:
    from lungs_utils.xrays import cache

    first = D.load(tiny_data, progress=False)
    target, folder = first.train.path, first.train.path.parent
    dead = folder / f"{cache._temp_prefix(target, _dead_pid())}k2x9q1ab.tmp"
    dead_ids = folder / f"{cache._temp_prefix(target.with_name(target.stem + '.ids.npy'), _dead_pid())}a1.tmp"
    live = folder / f"{cache._temp_prefix(target, os.getpid())}zz9y8x7w.tmp"
    elsewhere = folder / f".{target.name}.{os.getpid()}@another-machine.q1w2e3r4.tmp"  # pid means nothing here
    old_style = folder / f".{target.name}.abc_1234.tmp"  # io.atomic_path's name: no pid
    old_style_young = folder / f".{target.name}.def_5678.tmp"
    other_cache = folder / f"{cache._temp_prefix(folder / 'test-0123456789abcdef.npy', _dead_pid())}x.tmp"
    for p in (dead, dead_ids, live, elsewhere, old_style, old_style_young, other_cache):
        p.write_bytes(b"\0" * 64)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_style, (two_days_ago, two_days_ago))
    # Rebuild the train cache (an image changed).
    victim = tiny_data / "train_images" / f"img_{int(first.train.ids[0])}.png"
    os.utime(victim, ns=(1, 1))
    second = D.load(tiny_data, progress=False)
    assert second.train.path != first.train.path
    assert not dead.exists() and not dead_ids.exists() and not old_style.exists()
    assert live.exists() and elsewhere.exists() and old_style_young.exists()
    assert not other_cache.exists()  # the test cache's own check removed it (its writer is dead too)


# ----------------------------------------------------------------------------------------------- common size
def _lowest_id_image(folder: Path, sub: str = "train_images") -> Path:
    return min((folder / sub).iterdir(), key=lambda p: int(p.stem.split("_")[1]))


def test_an_odd_sized_first_image_does_not_set_the_size(tiny_data: Path) -> None:
    first = _lowest_id_image(tiny_data)
    Image.fromarray(np.full((48, 40), 120, np.uint8), "L").save(first)
    Image.fromarray(np.full((48, 40), 255, np.uint8), "L").save(tiny_data / "train_lung_masks" / first.name)
    with pytest.warns(DataWarning) as record:
        data = D.load(tiny_data, progress=False)
    assert data.train.size == (32, 32) and data.test.size == (32, 32)
    assert data.masks is not None and data.masks.size == (32, 32)
    lines = [str(w.message) for w in record]
    assert any("1 train image(s): resized to 32x32" in m and str(first) in m for m in lines), lines
    assert all("\n" not in m for m in lines)


@pytest.mark.parametrize("sub", ["train_images", "test_images", "train_lung_masks"])
@pytest.mark.parametrize("side", [(1, 1), (8, 300)])
def test_an_absurdly_small_image_is_refused_in_one_line(tiny_data: Path, isolated_env: Path, sub: str,
                                                       side: tuple[int, int]) -> None:
    victim = _lowest_id_image(tiny_data, sub)
    Image.fromarray(np.full(side, 7, np.uint8), "L").save(victim)
    h, w = side
    with pytest.raises(LungsError, match=rf"{victim.name}: image is {w}x{h} pixels, too small for a chest "
                                         rf"X-ray \(each side must be at least \d+ px\)") as exc:
        D.load(tiny_data, progress=False)
    assert str(victim) in str(exc.value) and "\n" not in str(exc.value)
    assert not _temps(isolated_env / "cache")
    if sub == "train_images":  # found from the headers, before anything is written
        assert _no_cache_files(isolated_env / "cache")


# ----------------------------------------------------------------------------------------------- huge images
@pytest.mark.parametrize("sub", ["train_images", "test_images", "train_lung_masks"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_over_pils_pixel_limit_is_one_line(tiny_data: Path, isolated_env: Path, sub: str, fmt: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Scaled down: the limit is 4100 pixels (the real one is 89 M), so 100x100 is over twice the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4100)
    victim = _lowest_id_image(tiny_data, sub)
    Image.fromarray(np.zeros((100, 100), np.uint8), "L").save(victim, format=fmt)
    size = "100x100 = " if fmt == "PNG" else ""  # PIL says only the pixel count for other formats
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(LungsError, match=rf"{victim.name}: image is {size}0.01 M pixels, over the "
                                             r"0.0082 M-pixel limit of PIL's decompression-bomb check; it "
                                             "cannot be a chest X-ray at this size") as exc:
            D.load(tiny_data, progress=False)
    assert str(victim) in str(exc.value) and "\n" not in str(exc.value)
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not _temps(isolated_env / "cache")


@pytest.mark.parametrize("sub", ["train_images", "test_images", "train_lung_masks"])
def test_an_image_between_pils_warning_and_error_limits_is_one_data_warning(
        tiny_data: Path, sub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4100)
    victim = sorted((tiny_data / sub).iterdir())[-1]
    pixels = np.zeros((80, 80), np.uint8)  # 6400 pixels: over 4100, under 8200
    pixels[20:60, 20:60] = 255
    Image.fromarray(pixels, "L").save(victim)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = D.load(tiny_data, progress=False)
    assert data.train.size == (32, 32)
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]
    lines = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    bomb = [m for m in lines if "decompression-bomb" in m]
    assert len(bomb) == 1 and str(victim) in bomb[0] and "\n" not in bomb[0], lines
    assert "over PIL's 0.0041 M-pixel decompression-bomb warning limit" in bomb[0]


# ----------------------------------------------------------------------------------------------- mask encodings
def _box() -> np.ndarray:
    """The lung box of conftest.write_dataset's 32 px masks, as 0/1."""
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 4:28] = 1
    return m


MASK_ENCODINGS = {
    "0/255": lambda m: Image.fromarray(m * 255, "L"),
    "0/1": lambda m: Image.fromarray(m, "L"),
    "mode 1": lambda m: Image.fromarray(m.astype(bool)),
    "16-bit 0/1": lambda m: Image.fromarray(m.astype(np.uint16)),
    "16-bit 0/65535": lambda m: Image.fromarray(m.astype(np.uint16) * 65535),
    "RGB 0/255": lambda m: Image.fromarray(m * 255, "L").convert("RGB"),
}


@pytest.mark.parametrize("encoding", list(MASK_ENCODINGS))
def test_binary_masks_in_any_encoding_decode_to_the_same_cache(tiny_data: Path, encoding: str) -> None:
    box = _box()
    for p in (tiny_data / "train_lung_masks").iterdir():
        MASK_ENCODINGS[encoding](box).save(p)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = D.load(tiny_data, progress=False)
    assert data.masks is not None
    expected = np.broadcast_to(box * 255, data.masks.images.shape)
    np.testing.assert_array_equal(np.asarray(data.masks.images), expected)
    lines = [str(w.message) for w in record]
    if encoding.startswith("RGB"):
        assert any("RGB converted to grayscale" in m for m in lines), lines
    else:
        assert not lines, lines


def test_anti_aliased_masks_keep_todays_threshold(tiny_data: Path) -> None:
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 4:28] = 255
    grey[8:24, 2:4] = 127  # resampling greys at the edge: half-covered pixels and less are background
    grey[8:24, 28:30] = 128
    grey[6:8, 4:28] = 200
    for p in (tiny_data / "train_lung_masks").iterdir():
        Image.fromarray(grey, "L").save(p)
    data = D.load(tiny_data, progress=False)
    assert data.masks is not None
    np.testing.assert_array_equal(data.masks.images[0], np.where(grey > 127, 255, 0))


@pytest.mark.parametrize("case, pattern", [
    ("empty", r"1 of 12 masks image\(s\): empty lung mask \(no lung pixel\), e\.g\. "),
    ("all ones", r"1 of 12 masks image\(s\): lung mask covers over 90% of the image, e\.g\. "),
])
def test_empty_or_full_masks_are_one_warning_line(tiny_data: Path, case: str, pattern: str) -> None:
    victim = sorted((tiny_data / "train_lung_masks").iterdir())[3]
    fill = 0 if case == "empty" else 1
    Image.fromarray(np.full((32, 32), fill, np.uint8), "L").save(victim)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        D.load(tiny_data, progress=False)
    lines = [str(w.message) for w in record]
    assert len(lines) == 1 and issubclass(record[0].category, DataWarning), lines
    assert re.search(pattern + re.escape(str(victim)), lines[0]) and "\n" not in lines[0], lines

