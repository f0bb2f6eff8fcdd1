"""`lungs predict`: any folder of films (formats, sizes, bad files, inverted films), with and without
answers, for a classifier, a cross-validation run and an ensemble; and film polarity in the data layer."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungs_utils.analysis import apply
from lungs_utils.xrays import data as D
from lungs_utils.analysis import ensemble
from lungs_utils.runs import experiment
from lungs_utils.xrays import phantom
from lungs_utils.xrays import polarity
from lungs_utils import params as P
from lungs_utils.app.cli import main
from lungs_utils.errors import DataWarning, LungsError
from lungs_utils.xrays.submission import PROB_COLUMNS


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A phantom dataset and three finished runs on it: a classifier, a 2-fold CV run, their ensemble."""
    root = tmp_path_factory.mktemp("apply")
    phantom.generate(root / "ph", n_train=48, n_test=9, size=48, seed=5, workers=1)
    data = root / "ph" / "data"
    outputs = root / "outputs"
    mp = pytest.MonkeyPatch()
    mp.setenv("LUNGS_OUTPUTS", str(outputs))
    base = {"data_dir": str(data), "model": "resnet_tiny", "epochs": 1, "image_size": 32, "batch_size": 8,
            "device": "cpu", "tta": True, "audit": False}
    experiment.run(P.load(overrides={**base, "run_name": "single"}), progress=False)
    experiment.run(P.load(overrides={**base, "run_name": "cv", "cv": 2}), progress=False)
    experiment.run(P.load(overrides={**base, "run_name": "cv_b", "cv": 2, "seed": 1, "model": "simple_cnn"}),
                   progress=False)
    mp.undo()
    ensemble.ensemble_runs([outputs / "cv", outputs / "cv_b"], outputs / "ens", method="weighted")
    return {"data": data, "outputs": outputs, "answers": root / "ph" / "test_answers.csv"}


@pytest.fixture(autouse=True)
def _outputs(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGS_OUTPUTS", str(runs["outputs"]))


@pytest.mark.parametrize("run", ["single", "cv", "ens"])
def test_predicting_the_test_folder_reproduces_the_runs_own_test_predictions(runs: dict, run: str,
                                                                              tmp_path: Path) -> None:
    """The same decoding, views, temperature and fold averaging as the run used on its test set."""
    result = apply.predict_folder(run, runs["data"] / "test_images", out=tmp_path)
    mine = pd.read_csv(tmp_path / "predictions.csv").sort_values("id")
    theirs = pd.read_csv(runs["outputs"] / run / "test_predictions.csv").sort_values("id")
    assert list(mine.columns) == ["file", "id", "predicted", "p0", "p1", "p2", "inverted"]
    assert mine["id"].tolist() == theirs["id"].tolist() and result["films"] == 9
    np.testing.assert_allclose(mine[list(PROB_COLUMNS)], theirs[list(PROB_COLUMNS)], atol=2e-5)
    assert result["kind"] == {"single": "classifier", "cv": "cv", "ens": "ensemble"}[run]


def _mixed_folder(runs: dict, folder: Path) -> dict[str, int]:
    """Films in every format a user may bring, plus two files that are not films; returns name -> class."""
    folder.mkdir()
    answers = pd.read_csv(runs["answers"]).set_index("id")["target_feature"]
    files = sorted((runs["data"] / "test_images").glob("img_*.png"))
    truth = {}
    a = np.asarray(Image.open(files[0]))
    Image.fromarray(a).convert("RGB").resize((80, 64)).save(folder / "from_another_hospital.jpg")
    truth["from_another_hospital.jpg"] = int(answers[int(files[0].stem[4:])])
    Image.fromarray((a.astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    truth["sixteen_bit.png"] = int(answers[int(files[0].stem[4:])])
    for f in files[1:4]:
        shutil.copy(f, folder / f.name)
        truth[f.name] = int(answers[int(f.stem[4:])])
    (folder / "notes.txt").write_text("not a film")
    (folder / "broken.png").write_bytes(files[5].read_bytes()[:60])
    return truth


def test_any_folder_of_films_bad_files_are_one_warning_line_each(runs: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    truth = _mixed_folder(runs, tmp_path / "films")
    assert main(["predict", "single", str(tmp_path / "films"), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    frame = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(frame["file"]) == sorted(truth) and len(frame) == 5
    assert frame["id"].isna().sum() == 2  # no id in a name like from_another_hospital.jpg
    np.testing.assert_allclose(frame[list(PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    err = captured.err
    assert "notes.txt: not an image file (.txt); skipped" in err and "broken.png: cannot decode image" in err
    assert "Traceback" not in err and "JPEG content" in err and "16-bit scaled to 8-bit" in err
    assert "5 film(s) predicted by single (classifier), 2 skipped" in captured.out


def test_answers_by_id_or_by_file_give_macro_f1_with_its_interval(runs: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "cv", str(runs["data"] / "test_images"), "--answers", str(runs["answers"]),
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "macro-F1 " in out and "(95% CI " in out and "(9 films with an answer)" in out
    assert "confusion matrix (rows: true" in out
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert scores["n"] == 9 and sum(map(sum, scores["confusion_matrix"])) == 9
    truth = _mixed_folder(runs, tmp_path / "films")
    by_file = tmp_path / "by_file.csv"
    pd.DataFrame({"file": list(truth), "target_feature": list(truth.values())}).to_csv(by_file, index=False)
    assert main(["predict", "cv", str(tmp_path / "films"), "--answers", str(by_file), "--out", str(tmp_path / "b")]) == 0
    assert "(5 films with an answer)" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["nope", "FILMS"], "run 'nope' not found"),
    (["single", "MISSING"], "does not exist; pass a folder of X-ray images"),
    (["single", "EMPTY"], "holds no files"),
    (["single", "TEXT"], "none of the 1 file(s) is a readable X-ray image"),
    (["single", "FILMS", "--answers", "BAD"], "expected header 'id,target_feature' or 'file,target_feature'"),
    (["single", "FILMS", "--masks", "EMPTY", "--mask-run", "x"], "not allowed with argument"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    (tmp_path / "bad.csv").write_text("name,label\na,1\n")
    places = {"FILMS": str(runs["data"] / "test_images"), "MISSING": str(tmp_path / "missing"),
              "EMPTY": str(tmp_path / "empty"), "TEXT": str(tmp_path / "text"), "BAD": str(tmp_path / "bad.csv")}
    argv = ["predict", *[places.get(a, a) for a in args], "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses two exclusive options itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_inverted_film_is_turned_upright_and_predicted_as_the_upright_one(runs: dict, tmp_path: Path) -> None:
    films = tmp_path / "films"
    films.mkdir()
    source = sorted((runs["data"] / "test_images").glob("img_*.png"))[:3]
    for f in source:
        shutil.copy(f, films / f.name)
        Image.fromarray(255 - np.asarray(Image.open(f))).save(films / f"inverted_{f.name}")
    with pytest.warns(UserWarning, match="3 of 6 film.s. look intensity-inverted"):
        result = apply.predict_folder("single", films, out=tmp_path / "out")
    frame = result["frame"].set_index("file")
    assert result["inverted"] == 3
    for f in source:
        assert bool(frame.loc[f"inverted_{f.name}", "inverted"]) and not bool(frame.loc[f.name, "inverted"])
        np.testing.assert_allclose(frame.loc[f"inverted_{f.name}", list(PROB_COLUMNS)].astype(float),
                                   frame.loc[f.name, list(PROB_COLUMNS)].astype(float), atol=1e-6)


def test_the_polarity_detector_finds_inverted_films_in_the_data_itself(tmp_path: Path) -> None:
    summary = phantom.generate(tmp_path / "ph", n_train=60, n_test=6, size=48, seed=8, workers=1)
    data_dir = Path(summary["data_dir"])
    clean = D.load(data_dir, progress=False)
    assert clean.polarity is not None and not clean.inverted_train.any() and not clean.inverted_test.any()
    target = sorted((data_dir / "train_images").glob("img_*.png"))[4]
    Image.fromarray(255 - np.asarray(Image.open(target))).save(target)
    with pytest.warns(UserWarning, match="1 of 60 train and 0 of 6 test film.* look intensity-inverted"):
        again = D.load(data_dir, progress=False)
    row = int(np.flatnonzero(again.train.ids == int(target.stem[4:]))[0])
    assert again.inverted_train.sum() == 1 and again.inverted_train[row]
    split = D.make_split(again.labels, 0.2, 0)
    train, val, _ = D.datasets(again, split.part(0))
    ds = train if row in train.indices else val
    i = int(np.flatnonzero(ds.indices == row)[0])
    upright = np.asarray(clean.train.images[row])
    assert np.array_equal(ds[i][0][0].numpy(), upright)  # read turned upright, as the clean film


def test_thumbnails_negate_under_inversion_so_the_detector_is_a_sign() -> None:
    rng = np.random.default_rng(0)
    films = rng.integers(0, 256, (5, 40, 40), dtype=np.uint8)
    np.testing.assert_allclose(polarity.thumbnails(255 - films), -polarity.thumbnails(films), atol=1e-6)
    detector = polarity.Polarity(rng.normal(size=polarity.THUMB ** 2))
    np.testing.assert_allclose(detector.margin(255 - films), -detector.margin(films), rtol=1e-5)
    turned = 255 - films
    assert np.array_equal(detector.upright(turned), detector.inverted(255 - films)) and (detector.margin(turned) >= 0).all()


def test_a_run_trained_with_masks_needs_the_films_masks(runs: dict) -> None:
    trained = apply.open_run("single")
    trained.params = {**trained.params, "masks": "channel"}
    films = apply.read_films(apply.list_films(runs["data"] / "test_images"), trained.shape, trained.polarity)
    assert trained.needs_masks
    with pytest.raises(LungsError, match="trained with masks: channel; pass the films' lung masks"):
        apply.predict(trained, films)


def test_predict_says_when_the_run_was_trained_on_the_phantom(runs: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A phantom-trained model predicts real films at macro-F1 0.27: lungs predict must say what it is."""
    films = runs["data"] / "test_images"
    assert main(["predict", "cv", str(films), "--out", str(tmp_path / "a")]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "SYNTHETIC phantom" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: run cv was trained on the SYNTHETIC phantom dataset")
    assert apply.open_run("ens").synthetic  # an ensemble of phantom-trained members is too
    real = tmp_path / "outputs" / "single"  # the same run, as if trained on real films
    shutil.copytree(runs["outputs"] / "single", real)
    metrics = json.loads((real / "metrics.json").read_text())
    (real / "metrics.json").write_text(json.dumps({**metrics, "synthetic_data": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # no warning at all for these films and this run
        result = apply.predict_folder(real, films, out=tmp_path / "b")
    assert result["trained_on_phantom"] is False
