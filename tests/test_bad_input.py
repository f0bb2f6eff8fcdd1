"""Issue 6's bad-input matrix through the command line: every mistake is one ``error:`` line that names
the file / key / row and says what to do, the exit status is 2, and nothing is left half-written.

Most cases are also tested one level down (``tests/test_data.py``, ``test_params.py``, ``test_train.py``,
``test_kaggle.py``, ``test_predict.py``, ``test_runner.py``); here the same mistakes go through ``lungs
train`` / ``lungs run`` / ``lungs submit`` as a user makes them, which adds the exit status and the
check that neither the run folder nor the image cache was touched. Deliberate fix-ups (colour, 16-bit,
JPEG content, odd sizes) are runs that succeed with one ``warning:`` line per kind.

Decided here: **gaps in the test ids are legal** (the competition's ids are not contiguous, nor are the
phantom's): the submission covers exactly the ids present in ``test_images/``, no more (no filler rows
for the gaps), no fewer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import snapshot, write_dataset
from lungs_utils.app.cli import main
from lungs_utils.paths import outputs_dir

TINY = {"run_name": "bad", "image_size": 32, "epochs": 1, "batch_size": 8, "device": "cpu", "tta": False,
        "seed": 0}


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bars share stderr with the error line; without them stderr is exactly what is asserted."""
    monkeypatch.setenv("LUNGS_PROGRESS", "off")


def write_params(path: Path, **values: object) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **values}))
    return path


def lungs(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    """The single ``error:`` line of a refused command (exit status 2, no traceback)."""
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def nothing_written(home: Path) -> None:
    """No run folder, and no image cache or split (complete or partial) under the cache root."""
    assert snapshot(outputs_dir()) == {}
    cache = home / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file()], sorted(cache.rglob("*"))


# ------------------------------------------------------------------------------------------------ data
def _answers(root: Path, text: str) -> None:
    (root / "train_answers.csv").write_text(text)


def _ids(root: Path) -> list[str]:
    return [line.split(",")[0] for line in (root / "train_answers.csv").read_text().splitlines()[1:3]]


def _a_train_image(root: Path) -> Path:
    return sorted((root / "train_images").iterdir())[-1]


def _missing_folder(root: Path) -> Path:
    return root.parent / "no-such-folder"


def _empty_folder(root: Path) -> Path:
    empty = root.parent / "empty"
    empty.mkdir()
    return empty


def _no_images(root: Path) -> Path:
    for p in (root / "train_images").iterdir():
        p.unlink()
    return root


def _answers_case(text: str | None):
    def make(root: Path) -> Path:
        a, b = _ids(root)
        if text is None:
            (root / "train_answers.csv").unlink()
        else:
            _answers(root, text.format(a=a, b=b))
        return root
    return make


def _truncated_png(root: Path) -> Path:
    victim = _a_train_image(root)
    victim.write_bytes(victim.read_bytes()[:60])
    return root


def _not_an_image(root: Path) -> Path:
    _a_train_image(root).write_bytes(b"<html>404 not found</html>")
    return root


def _one_pixel_image(root: Path) -> Path:
    Image.fromarray(np.zeros((1, 1), np.uint8), "L").save(_a_train_image(root))
    return root


def _huge_image(root: Path) -> Path:
    # Real size, real PIL limit: 196 M pixels of zeros compress to ~190 KB (written in about a second).
    Image.new("L", (14000, 14000)).save(_a_train_image(root))
    return root


# case: (make the mistake → data_dir to pass, regex the error line must match)
DATA_CASES = {
    "missing data folder": (_missing_folder, r"data_dir: data folder \S+no-such-folder does not exist; point it at"),
    "empty folder": (_empty_folder, r"data_dir: \S+empty has no train_images/ folder; point it at"),
    "no train images": (_no_images, r"train_images holds no img_<id>.png files; re-download"),
    "answers missing": (_answers_case(None), r"train_answers.csv is missing: .*re-download"),
    "answers empty": (_answers_case(""), r"train_answers.csv is empty; it needs a header 'id,target_feature'"),
    "answers header only": (_answers_case("id,target_feature\n"), r"train_answers.csv has a header but no rows"),
    "answers without id": (_answers_case("image,target_feature\n1,0\n"),
                           r"train_answers.csv: missing column\(s\) id; expected header 'id,target_feature'"),
    "answers without target_feature": (_answers_case("id,label\n1,0\n"),
                                       r"train_answers.csv: missing column\(s\) target_feature"),
    "non-integer id": (_answers_case("id,target_feature\n{a},0\n12.5,1\n"),
                       r"train_answers.csv: line 3: id '12.5' is not a non-negative integer; fix or delete that row"),
    "duplicate id": (_answers_case("id,target_feature\n{a},0\n{b},1\n{a},2\n"),
                     r"train_answers.csv: line 4: id \d+ is a duplicate of line 2; keep one of them"),
    "label outside {0,1,2}": (_answers_case("id,target_feature\n{a},0\n{b},-1\n"),
                              r"train_answers.csv: line 3: label '-1' is not 0, 1 or 2; fix or delete"),
    "label 3": (_answers_case("id,target_feature\n{a},0\n{b},3\n"),
                r"train_answers.csv: line 3: label '3' is outside \{0, 1, 2\}"),
    "id without an image": (_answers_case("id,target_feature\n{a},0\n424242,1\n"),
                            r"train_answers.csv: line 3: id 424242 has no image \S+img_424242.png; restore"),
    "truncated png": (_truncated_png, r"img_\d+.png: cannot decode image .*re-download it or remove its row"),
    "not an image": (_not_an_image, r"img_\d+.png: cannot decode image .*re-download it or remove its row"),
    "1x1 image": (_one_pixel_image, r"img_\d+.png: image is 1x1 pixels, too small for a chest X-ray \(each side "
                                    r"must be at least \d+ px\); re-download it"),
    "image over PIL's pixel limit": (_huge_image, r"img_\d+.png: image is 14000x14000 = 196 M pixels, over the "
                                                  r"179 M-pixel limit of PIL's decompression-bomb check; it cannot "
                                                  r"be a chest X-ray at this size"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, isolated_env: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    make, pattern = DATA_CASES[case]
    data_dir = make(write_dataset(tmp_path / "data"))
    params = write_params(tmp_path / "p.yaml", data_dir=str(data_dir))
    line = one_error_line(*lungs(capsys, "train", params)[::2])
    assert pd.Series([line]).str.contains(pattern).all(), line
    nothing_written(isolated_env)


def test_no_data_anywhere(tmp_path: Path, isolated_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = write_params(tmp_path / "p.yaml", data_dir=None)
    line = one_error_line(*lungs(capsys, "train", params)[::2])
    assert "no dataset found: run `lungs download`" in line and "lungs phantom" in line
    nothing_written(isolated_env)


def test_no_disk_space_for_the_cache(tmp_path: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from lungs_utils.xrays import cache

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    params = write_params(tmp_path / "p.yaml", data_dir=str(write_dataset(tmp_path / "data")))
    line = one_error_line(*lungs(capsys, "train", params)[::2])
    assert "not enough disk space for the image cache in" in line and "LUNGS_CACHE_DIR" in line
    nothing_written(isolated_env)


# ------------------------------------------------------------------------------------------------ params
@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("content, pattern", [
    (b"epochs: [3\nlr: 0.1\n", r"bad.yaml: line \d+ is not valid YAML .*'key: value' lines"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"bad.yaml: (not a text YAML file|line \d+ is not valid YAML)"),
    (b"- epochs\n- 3\n", r"bad.yaml: expected 'key: value' lines \(a YAML mapping\), got list"),
    (b"epochs: ten\n", r"bad.yaml: 'epochs' must be integer, got 'ten'"),
    (b"epoch: 3\n", r"bad.yaml: unknown key 'epoch' \(did you mean 'epochs'\?\); valid keys: "),
])
def test_bad_params_file(command: str, content: bytes, pattern: str, tmp_path: Path, isolated_env: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    line = one_error_line(*lungs(capsys, command, bad)[::2])
    assert pd.Series([line]).str.contains(pattern).all(), line
    nothing_written(isolated_env)


@pytest.mark.parametrize("override, pattern", [
    ("epochs", r"-p 'epochs': expected key=value, e.g. -p epochs=5"),
    ("epochs=ten", r"-p epochs: 'epochs' must be integer, got 'ten'"),
    ("learning_rate=0.1", r"unknown key 'learning_rate'.*valid keys"),
    ("model=resnet9000", r"unknown model 'resnet9000'; valid names: .*simple_cnn"),
])
def test_bad_override_for_lungs_train(override: str, pattern: str, tmp_path: Path, isolated_env: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    params = write_params(tmp_path / "p.yaml", data_dir=str(write_dataset(tmp_path / "data")))
    line = one_error_line(*lungs(capsys, "train", params, "-p", override)[::2])
    assert pd.Series([line]).str.contains(pattern).all(), line
    assert snapshot(outputs_dir()) == {}


def test_unknown_model_fails_before_the_data_is_decoded(tmp_path: Path, isolated_env: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    params = write_params(tmp_path / "p.yaml", data_dir=str(write_dataset(tmp_path / "data")))
    one_error_line(*lungs(capsys, "train", params, "-p", "model=resnet9000")[::2])
    nothing_written(isolated_env)


# ------------------------------------------------------------------------------------------------ checkpoints
def _trained_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A finished 1-epoch simple_cnn run (params file, run folder)."""
    params = write_params(tmp_path / "p.yaml", data_dir=str(write_dataset(tmp_path / "data")),
                          model="simple_cnn")
    code, _, err = lungs(capsys, "train", params)
    assert code == 0, err
    return params, outputs_dir() / "bad"


def _contents(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


# Files a refused resume must leave as they were (the record of what the run did).
RESULTS_ONLY = ("params.yaml", "split.csv")


def test_resume_from_a_checkpoint_of_another_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params, run = _trained_run(tmp_path, capsys)
    before = _contents(run, skip=RESULTS_ONLY)
    line = one_error_line(*lungs(capsys, "train", params, "-p", "resume=true", "-p", "model=resnet_tiny")[::2])
    assert f"{run / 'checkpoints' / 'last.pt'} holds weights of 'simple_cnn' that do not fit this model" in line
    assert line.endswith("set model: simple_cnn or choose a checkpoint of this model")
    assert _contents(run, skip=RESULTS_ONLY) == before


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params, run = _trained_run(tmp_path, capsys)
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 a zip that ends here")
    before = _contents(run, skip=RESULTS_ONLY)
    line = one_error_line(*lungs(capsys, "train", params, "-p", "resume=true")[::2])
    assert f"{run / 'checkpoints' / 'last.pt'} is not a lungs checkpoint" in line
    assert "use checkpoints/best.pt or last.pt from a run folder" in line
    assert _contents(run, skip=RESULTS_ONLY) == before


def test_a_refused_resume_leaves_params_yaml_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params, run = _trained_run(tmp_path, capsys)
    before = _contents(run)
    one_error_line(*lungs(capsys, "train", params, "-p", "resume=true", "-p", "model=resnet_tiny")[::2])
    assert _contents(run) == before


# ------------------------------------------------------------------------------------------------ deliberate fix-ups
def test_odd_images_are_converted_with_one_warning_line_each(tmp_path: Path, isolated_env: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # PIL's decompression-bomb limits scaled down (warning over 4100 pixels, error over 8200): an 80x80
    # image stands for one between the real 89 M and 179 M pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4100)
    root = write_dataset(tmp_path / "data")
    # Not the lowest id: its image sets the common size.
    train = sorted((root / "train_images").iterdir(), key=lambda p: int(p.stem.split("_")[1]))[1:]
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, "RGB").save(train[0])
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 255, np.uint8)]), "RGBA").save(train[1])
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(train[2])
    Image.fromarray(np.full((32, 32), 90, np.uint8), "L").save(train[3], format="JPEG")
    Image.fromarray(np.full((40, 48), 90, np.uint8), "L").save(train[4])
    mask = root / "train_lung_masks" / train[5].name
    Image.fromarray(np.full((64, 64), 255, np.uint8), "L").save(mask)
    Image.fromarray(np.full((80, 80), 90, np.uint8), "L").save(train[6])
    params = write_params(tmp_path / "p.yaml", data_dir=str(root))
    code, out, err = lungs(capsys, "train", params)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    for kind, example in (("RGB converted to grayscale", train[0]), ("RGBA converted to grayscale", train[1]),
                          ("16-bit scaled to 8-bit", train[2]), ("JPEG content", train[3]),
                          ("train image(s): resized to 32x32", train[4]),
                          ("masks image(s): resized to 32x32", mask),
                          ("train image(s): over PIL's 0.0041 M-pixel decompression-bomb warning limit", train[6]),
                          ("masks image(s): lung mask covers over 90% of the image", mask)):
        assert any(kind in w and str(example) in w for w in warnings), (kind, warnings)
    assert "DecompressionBomb" not in err and len(warnings) == len(err.splitlines()), err
    assert "val macro-F1" in out and (outputs_dir() / "bad" / "submission.csv").is_file()


# ------------------------------------------------------------------------------------------------ test ids
def _gappy(tmp_path: Path) -> tuple[Path, list[int]]:
    root = write_dataset(tmp_path / "data")
    for p in (root / "test_images").iterdir():
        p.unlink()
    ids = [3, 4, 17, 1000]
    for i in ids:
        Image.fromarray(np.full((32, 32), 10 * (i % 7), np.uint8), "L").save(root / "test_images" / f"img_{i}.png")
    return root, ids


def test_test_ids_with_gaps_give_a_submission_of_exactly_those_ids(tmp_path: Path, isolated_env: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root, ids = _gappy(tmp_path)
    code, _, err = lungs(capsys, "train", write_params(tmp_path / "p.yaml", data_dir=str(root)))
    assert code == 0, err
    run = outputs_dir() / "bad"
    assert pd.read_csv(run / "submission.csv")["id"].tolist() == ids
    assert pd.read_csv(run / "test_predictions.csv")["id"].tolist() == ids

    # `lungs submit` checks against the ids present: the right file passes the local checks (and then
    # stops at the missing credentials, before any network use) ...
    line = one_error_line(*lungs(capsys, "submit", run / "submission.csv", "-m", "gaps", "--data", root)[::2])
    assert "no Kaggle credentials" in line
    # ... while filling a gap, dropping an id, or numbering rows 0..n-1 is refused with the row named.
    for name, rows, pattern in (
            ("filled.csv", [3, 4, 5, 17, 1000], r"line 4: id 5 is not a test image id"),
            ("short.csv", [3, 4, 17], r"test id 1000 has no row; the submission needs one row per test image \(4\)"),
            ("positional.csv", [0, 1, 2, 3], r"line 2: id 0 \(and 2 more unexpected id\(s\)\) is not a test image id")):
        sub = tmp_path / name
        pd.DataFrame({"id": rows, "target_feature": [0] * len(rows)}).to_csv(sub, index=False)
        line = one_error_line(*lungs(capsys, "submit", sub, "-m", "gaps", "--data", root)[::2])
        assert str(sub) in line and pd.Series([line]).str.contains(pattern).all(), line


def test_two_files_with_the_same_id_are_refused(tmp_path: Path, isolated_env: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _gappy(tmp_path)
    shutil.copy(root / "test_images" / "img_17.png", root / "test_images" / "img_0017.png")
    line = one_error_line(*lungs(capsys, "train", write_params(tmp_path / "p.yaml", data_dir=str(root)))[::2])
    assert "img_0017.png" in line and "img_17.png" in line


# ------------------------------------------------------------------------------------------------ classes
def _relabel(root: Path, labels: list[int]) -> None:
    table = pd.read_csv(root / "train_answers.csv")
    table["target_feature"] = labels[: len(table)]
    table.to_csv(root / "train_answers.csv", index=False)


def test_a_single_class_is_refused_before_anything_is_decoded(tmp_path: Path, isolated_env: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = write_dataset(tmp_path / "data")
    _relabel(root, [2] * 12)
    code, _, err = lungs(capsys, "train", write_params(tmp_path / "p.yaml", data_dir=str(root)))
    line = one_error_line(code, err)
    assert "every train image has label 2 (COVID-19)" in line and "at least two classes" in line
    nothing_written(isolated_env)


@pytest.mark.parametrize("labels, expected", [
    ([0, 1] * 6, ["class 2 (COVID-19) has no train image"]),
    ([0, 1] * 5 + [0, 2], ["class 2 (COVID-19) has only 1 train image", "split is not stratified"]),
])
def test_a_missing_or_lone_class_is_a_warning_and_the_run_goes_on(tmp_path: Path, labels: list[int],
                                                                   expected: list[str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = write_dataset(tmp_path / "data")
    _relabel(root, labels)
    code, _, err = lungs(capsys, "train", write_params(tmp_path / "p.yaml", data_dir=str(root)))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    for text in expected:
        assert sum(text in w for w in warnings) == 1, warnings
