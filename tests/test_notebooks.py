"""The notebook suite and its params files.

Static checks (fast): committed notebooks carry no outputs, exactly one ``parameters`` cell of known
keys, the kernelspec papermill needs, and only thin calls; every params file is valid.

End to end (slow, one shared session): ``lungs demo`` on a tiny phantom dataset at 32 px / 1 epoch
runs the ``params/demo`` pipeline (data, simple CNN, tiny ResNet, ensemble, leaderboard) and the
report; ``lungs pipeline`` runs lung segmentation, ResNet-18 and U-Net at 32 px (the browser test runs
every notebook); every run folder must satisfy the run-folder contract of docs/design.md and no cell may have errored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from lungs_utils import models, params as params_mod

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAMS = sorted((ROOT / "params").glob("*.yaml")) + sorted((ROOT / "params" / "demo").glob("*.yaml"))
MODEL_NOTEBOOKS = {"10_simple_cnn", "11_resnet", "12_unet", "13_mobilenet", "14_vgg", "15_modern"}
EXPECTED = {"00_data", "05_lung_segmentation", *MODEL_NOTEBOOKS, "90_ensemble", "95_leaderboard", "96_explore", "97_sweep"}
TINY = ["-p", "image_size=32", "-p", "epochs=1", "-p", "batch_size=8"]


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


# ------------------------------------------------------------------------------------------------ static
def test_the_suite_is_complete() -> None:
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path: Path) -> None:
    nb = read(path)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"] == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert nb.metadata["language_info"]["name"] == "python"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip outputs before committing"
    assert nb.cells[0].cell_type == "markdown"  # the story starts with a narrative
    assert "papermill" not in nb.metadata  # not an executed copy


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_validates_without_a_warning(path: Path) -> None:
    """nbformat 4.5 wants an id on every cell; papermill, JupyterLab and nbconvert warn about each missing
    one (MissingIDFieldWarning) on every run of the notebook."""
    import json
    import warnings

    raw = json.loads(path.read_text(encoding="utf-8"))
    ids = [c.get("id") for c in raw["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), "every cell needs its own id"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(nbformat.from_dict(raw))
        nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_sets_known_valid_keys(path: Path) -> None:
    nb = read(path)
    cell = parameters_cell(nb)
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 - our own committed file: plain assignments
    values = {k: v for k, v in namespace.items() if not k.startswith("__")}
    assert set(values) <= set(params_mod.SCHEMA), set(values) - set(params_mod.SCHEMA)
    resolved = params_mod.resolve(values)
    assert resolved["model"] in models.names()
    if path.stem in MODEL_NOTEBOOKS:
        # Quick CPU defaults that still learn (the browser test checks their validation macro-F1).
        assert resolved["image_size"] <= 64 and resolved["epochs"] <= 32 and not resolved["tta"]
        assert values["data_dir"] is None  # discovery by default
    # papermill can parse it (it warns "Unable to parse line" otherwise and loses the defaults)
    import papermill

    assert set(papermill.inspect_notebook(str(path))) == set(values)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin(path: Path) -> None:
    """Logic lives in lungs_utils (tested); notebooks hold narrative and calls."""
    nb = read(path)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for banned in ("def ", "class ", "lambda", "for ", "while ", "import torch"):
        assert banned not in source, f"{banned!r} in a code cell: move it into lungs_utils"
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 10
    assert f'from_namespace(globals(), notebook="{path.name}")' in source
    # params are read from the notebook's globals: an import named like a key would replace its value.
    import ast

    from lungs_utils.params import SCHEMA

    imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not imported & set(SCHEMA), f"imports shadow params: {imported & set(SCHEMA)}"


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: str(p.relative_to(ROOT / "params")))
def test_params_file_is_valid(path: Path) -> None:
    values = params_mod.load(path)
    assert (ROOT / "notebooks" / values["notebook"]).is_file()
    assert values["model"] in models.names()
    assert values["data_dir"] is None  # committed recipes discover the data
    raw = yaml.safe_load(path.read_text())
    assert "notebook" in raw and "run_name" in raw


def test_params_cover_every_model_notebook_and_recipes_are_full_size() -> None:
    full = [params_mod.load(p) for p in sorted((ROOT / "params").glob("[0-9]*.yaml"))]
    assert {Path(v["notebook"]).stem for v in full} == EXPECTED
    for v in full:
        if Path(v["notebook"]).stem in MODEL_NOTEBOOKS:
            assert v["image_size"] == 256 and 30 <= v["epochs"] <= 40 and v["batch_size"] == 64
            assert v["tta"] and v["label_smoothing"] == 0.1 and v["scheduler"] == "cosine"
    assert len({v["run_name"] for v in full}) == len(full)


def test_demo_params_chain_together() -> None:
    demo = [params_mod.load(p) for p in sorted((ROOT / "params" / "demo").glob("*.yaml"))]
    names = [v["run_name"] for v in demo]
    ensemble = next(v for v in demo if v["notebook"] == "90_ensemble.ipynb")
    trained = [v["run_name"] for v in demo if Path(v["notebook"]).stem in MODEL_NOTEBOOKS]
    assert len(trained) >= 2 and sorted(ensemble["runs"]) == sorted(trained)
    assert names.index(ensemble["run_name"]) > max(names.index(n) for n in trained)
    assert [Path(v["notebook"]).stem for v in demo][0] == "00_data"
    assert all(v["device"] == "cpu" and v["image_size"] <= 128 for v in demo
               if Path(v["notebook"]).stem in MODEL_NOTEBOOKS)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the demo and the other model notebooks once, at toy size, in an isolated project root."""
    home = tmp_path_factory.mktemp("suite_home")
    for sub in ("params", "notebooks"):
        (home / sub).mkdir()  # empty: the suite's own notebooks and params are found as fallback
    env = {k: v for k, v in os.environ.items()
           if k not in ("LUNGS_DATA_DIR", "LUNGS_OUTPUTS", "KAGGLE_USERNAME", "KAGGLE_KEY")}
    env.update(LUNGS_HOME=str(home), LUNGS_CACHE_DIR=str(home / "cache"), HOME=str(home),
               LUNGS_KAGGLE_INPUT=str(home / "no-kaggle"), XDG_CONFIG_HOME=str(home / ".config"),
               MPLBACKEND="Agg")

    def lungs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lungs_utils", *args], capture_output=True, text=True,
                              env=env, cwd=home)

    demo = lungs("demo", "--train", "36", "--test", "9", "--size", "48", *TINY)
    extra = home / "extra"
    extra.mkdir()
    # 13_mobilenet and 14_vgg run the same experiment.run through the same cells: the browser test runs
    # them (and checks their run folders); each notebook here costs CI a kernel and a torch import.
    for name in ("05_lung_segmentation", "11_resnet18", "12_unet"):
        (extra / f"{name}.yaml").write_text((ROOT / "params" / f"{name}.yaml").read_text())
    pipeline = lungs("pipeline", str(extra), *TINY, "-p", "device=cpu")
    # A classifier that reads the segmentation run's predicted masks.
    masked = lungs("run", str(ROOT / "params" / "11_resnet18.yaml"), *TINY, "-p", "device=cpu",
                   "-p", "masks=crop", "-p", "mask_run=lung_masks", "-p", "run_name=resnet18_crop")
    # Cross-validation in a notebook, with the segmentation run's out-of-fold masks as a second channel.
    cv = lungs("run", str(ROOT / "params" / "15_resnet_tiny.yaml"), *TINY, "-p", "device=cpu", "-p", "cv=2",
               "-p", "masks=channel", "-p", "mask_run=lung_masks", "-p", "run_name=cv_channel")
    explore = lungs("run", str(ROOT / "params" / "96_explore.yaml"), "-p", "runs=[cv_channel]")
    return {"home": home, "outputs": home / "outputs", "env": env, "demo": demo, "pipeline": pipeline,
            "masked": masked, "cv": cv, "explore": explore, "data_dir": home / "data" / "phantom" / "data"}


@pytest.mark.slow
def test_a_notebook_run_directly_never_replaces_a_finished_run(suite: dict) -> None:
    """Plain papermill (or Run All in JupyterLab) with the run_name of a finished run: refused, nothing lost."""
    from conftest import snapshot

    run = suite["outputs"] / "demo_resnet_tiny"
    before = snapshot(run)
    assert (run / "metrics.json").is_file()
    out = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "15_modern.ipynb"),
                          str(suite["home"] / "direct.ipynb"), "-p", "run_name", "demo_resnet_tiny",
                          "-p", "epochs", "1", "-p", "image_size", "32", "-p", "device", "cpu"],
                         env=suite["env"], cwd=suite["home"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "already holds a run" in out.stdout + out.stderr and "overwrite = True" in out.stdout + out.stderr
    assert snapshot(run) == before


CONTRACT = ("params.yaml", "run.json", "history.csv", "metrics.json", "val_predictions.csv",
            "test_predictions.csv", "submission.csv", "split.csv", "checkpoints/best.pt", "checkpoints/last.pt",
            "plots/learning_curves.png", "plots/confusion_matrix.png", "plots/per_class.png",
            "plots/confident_mistakes.png", "plots/gradcam.png")


def assert_no_cell_errored(notebook: Path) -> None:
    nb = read(notebook)
    assert nb.metadata["papermill"]["exception"] in (None, False)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{notebook}: {output.get('ename')}: {output.get('evalue')}"
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 1  # pictures made it into the executed notebook


def assert_model_run(folder: Path, notebook: str, model: str) -> None:
    for name in CONTRACT:
        assert (folder / name).is_file(), f"{folder.name}: {name} missing"
    assert_no_cell_errored(folder / notebook)
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and info["executed_notebook"] == str(folder / notebook)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["model"] == model and 0 <= metrics["val_macro_f1"] <= 1
    # Every classifier notebook audits its model and calibrates its probabilities.
    assert metrics["audit"]["status"] == "ok" and set(metrics["audit"]["blanking"]) == {
        "full", "outside_blanked", "lungs_blanked"}
    assert metrics["calibration"]["applied"] and metrics["calibration"]["temperature"] > 0
    assert (folder / "audit.csv").is_file()
    for picture in ("audit", "reliability"):
        assert (folder / "plots" / f"{picture}.png").is_file(), picture
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["image_size"] == 32 and params["epochs"] == 1 and params["model"] == model
    submission = pd.read_csv(folder / "submission.csv")
    assert list(submission.columns) == ["id", "target_feature"] and len(submission) == 9
    assert len(pd.read_csv(folder / "history.csv")) == 1


@pytest.mark.slow
def test_demo_runs_the_demo_pipeline_and_reports(suite: dict) -> None:
    demo = suite["demo"]
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = suite["outputs"]
    assert "generated phantom dataset" in demo.stdout
    assert_model_run(out / "demo_resnet_tiny", "15_modern.ipynb", "resnet_tiny")
    assert_model_run(out / "demo_resnet_tiny_masks", "15_modern.ipynb", "resnet_tiny")
    assert yaml.safe_load((out / "demo_resnet_tiny_masks" / "params.yaml").read_text())["masks"] == "channel"
    assert_no_cell_errored(out / "demo_lung_masks" / "05_lung_segmentation.ipynb")
    assert len(list((out / "demo_lung_masks" / "masks" / "test").glob("img_*.png"))) == 9
    data_run = out / "demo_data"
    assert_no_cell_errored(data_run / "00_data.ipynb")
    for picture in ("class_balance", "samples", "mask_overlays", "intensity_histograms", "split_balance"):
        assert (data_run / "plots" / f"{picture}.png").is_file()
    ens = out / "demo_ensemble"
    assert_no_cell_errored(ens / "90_ensemble.ipynb")
    for name in ("submission.csv", "val_predictions.csv", "test_predictions.csv", "metrics.json",
                 "ensemble.json", "params.yaml", "run.json", "plots/members_vs_ensemble.png"):
        assert (ens / name).is_file(), name
    weights = json.loads((ens / "ensemble.json").read_text())["weights"]
    assert set(weights) == {"demo_resnet_tiny", "demo_resnet_tiny_masks"}
    assert_no_cell_errored(out / "demo_leaderboard" / "95_leaderboard.ipynb")
    board = pd.read_csv(out / "leaderboard.csv")
    assert {"demo_resnet_tiny", "demo_resnet_tiny_masks", "demo_ensemble"} <= set(board["run"])
    assert {"lung_share", "lungs_blanked_f1", "audit", "ece"} <= set(board.columns)
    assert set(board.loc[board["run"] == "demo_resnet_tiny", "audit"]) <= {"ok", "FLAG"}
    assert {"val_f1_low", "val_f1_high", "vs_best"} <= set(board.columns)  # every score with its interval
    index = out / "report" / "index.html"
    assert f"report: {index}" in demo.stdout and "demo_resnet_tiny" in demo.stdout
    for name in ("demo_data", "demo_lung_masks", "demo_resnet_tiny", "demo_resnet_tiny_masks",
                 "demo_ensemble", "demo_leaderboard"):
        assert (out / "report" / f"{name}.html").stat().st_size > 10_000
        assert f'href="{name}.html"' in index.read_text()
    assert "lungs_blanked_f1" in index.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("run_name,notebook,model", [
    ("resnet18", "11_resnet.ipynb", "resnet18"), ("unet", "12_unet.ipynb", "unet")])
def test_pipeline_runs_the_other_model_notebooks(suite: dict, run_name: str, notebook: str, model: str) -> None:
    result = suite["pipeline"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_name in result.stdout  # the summary table
    assert_model_run(suite["outputs"] / run_name, notebook, model)


@pytest.mark.slow
def test_segmentation_notebook_writes_masks_for_every_test_image(suite: dict) -> None:
    result = suite["pipeline"]
    assert result.returncode == 0, result.stdout + result.stderr
    folder = suite["outputs"] / "lung_masks"
    assert_no_cell_errored(folder / "05_lung_segmentation.ipynb")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and 0 <= metrics["val_dice"] <= 1 and metrics["n_test"] == 9
    test_ids = sorted(int(p.stem[4:]) for p in (suite["data_dir"] / "test_images").glob("img_*.png"))
    assert sorted(int(p.stem[4:]) for p in (folder / "masks" / "test").glob("img_*.png")) == test_ids
    assert len(list((folder / "masks" / "train_oof").glob("img_*.png"))) == 36  # folds: 3 covers all
    for name in ("given_masks", "learning_curves", "oof_masks", "test_masks"):
        assert (folder / "plots" / f"{name}.png").is_file(), name
    for k in range(3):
        assert (folder / f"fold_{k}" / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_classifier_notebook_uses_predicted_masks(suite: dict) -> None:
    result = suite["masked"]
    assert result.returncode == 0, result.stdout + result.stderr
    folder = suite["outputs"] / "resnet18_crop"
    assert_model_run(folder, "11_resnet.ipynb", "resnet18")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["masks"] == "crop" and params["mask_run"] == "lung_masks"
    assert "lung masks" in (folder / "11_resnet.ipynb").read_text()  # the experiment summary says so


@pytest.mark.slow
def test_a_model_notebook_runs_cross_validation_with_lung_masks(suite: dict) -> None:
    result = suite["cv"]
    assert result.returncode == 0, result.stdout + result.stderr
    folder = suite["outputs"] / "cv_channel"
    notebook = folder / "15_modern.ipynb"
    assert_no_cell_errored(notebook)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["cv"]["k"] == 2 and metrics["n_val"] == 36 and metrics["val_set"].startswith("out-of-fold")
    assert metrics["audit"]["status"] == "ok" and metrics["audit"]["n"] == 36  # every train image, out-of-fold
    assert len(pd.read_csv(folder / "oof_predictions.csv")) == 36
    assert sorted(pd.read_csv(folder / "history.csv")["fold"].unique()) == [0, 1]
    for k in range(2):
        assert (folder / f"fold_{k}" / "checkpoints" / "best.pt").is_file()
    text = notebook.read_text()
    assert "out-of-fold macro-F1" in text and "fold 1" in text and "out-of-fold" in text  # score line, table
    assert "Confusion matrix: out-of-fold" in text or (folder / "plots" / "confusion_matrix.png").is_file()
    for picture in ("learning_curves", "confusion_matrix", "reliability", "audit", "gradcam"):
        assert (folder / "plots" / f"{picture}.png").is_file(), picture


@pytest.mark.slow
def test_the_explore_notebook_explains_a_film_with_a_cross_validation_run(suite: dict) -> None:
    result = suite["explore"]
    assert result.returncode == 0, result.stdout + result.stderr
    notebook = suite["outputs"] / "explore" / "96_explore.ipynb"
    assert_no_cell_errored(notebook)
    text = notebook.read_text()
    assert "run cv_channel" in text and "the model says" in text and "teaching tool, not a diagnosis" in text
    assert "application/vnd.jupyter.widget-view+json" in text  # the controls were built


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:using the SYNTHETIC phantom dataset")  # in-process: the user's one notice
def test_resume_continues_training_from_last_checkpoint(suite: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungs_utils.runs import runner

    for key, value in suite["env"].items():
        monkeypatch.setenv(key, value)
    folder = suite["outputs"] / "demo_resnet_tiny"
    assert (folder / "checkpoints" / "last.pt").is_file()
    record = runner.run(ROOT / "params" / "demo" / "15_resnet_tiny.yaml",
                        ["image_size=32", "epochs=2", "batch_size=8"], on_exists="resume")
    assert record.ok and record.run_dir == folder
    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == [1, 2]  # epoch 1 came from the checkpoint, epoch 2 is new
    executed = (folder / "15_modern.ipynb").read_text()
    assert "resuming from" in executed


@pytest.mark.slow
def test_plain_papermill_with_a_params_file(suite: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`papermill notebooks/10_simple_cnn.ipynb out.ipynb -f params/10_simple_cnn.yaml` (Python API)."""
    import papermill

    for key, value in suite["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    parameters = yaml.safe_load((ROOT / "params" / "10_simple_cnn.yaml").read_text())
    parameters.update(run_name="plain", data_dir=str(suite["data_dir"]), image_size=32, epochs=1,
                      batch_size=8, tta=False)
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "10_simple_cnn.ipynb"), str(out),
                               parameters=parameters, kernel_name="python3", progress_bar=False)
    assert_no_cell_errored(out)
    folder = suite["outputs"] / "plain"
    assert (folder / "submission.csv").is_file() and (folder / "plots" / "gradcam.png").is_file()
    assert yaml.safe_load((folder / "params.yaml").read_text())["lr"] == parameters["lr"]


def test_mask_mode_comparison_folder_is_the_cpu_recipes_with_each_mode() -> None:
    """params/masks/ (one `lungs pipeline` command) must not drift from the recipes it compares."""
    folder = sorted((ROOT / "params" / "masks").glob("*.yaml"))
    runs = [params_mod.load(p) for p in folder]
    seg, classifiers = runs[0], runs[1:]
    assert seg["notebook"] == "05_lung_segmentation.ipynb" and seg["cv"]
    own = ("run_name", "masks", "mask_run")
    base = params_mod.load(ROOT / "params" / "05_lung_segmentation.yaml")
    assert {k: v for k, v in seg.items() if k not in own} == {k: v for k, v in base.items() if k not in own}
    recipe = params_mod.load(ROOT / "params" / "cpu_small.yaml")
    assert sorted(v["masks"] for v in classifiers) == sorted(params_mod.MASK_MODES)
    for v in classifiers:
        assert v["mask_run"] == seg["run_name"]
        assert {k: x for k, x in v.items() if k not in own} == {k: x for k, x in recipe.items() if k not in own}
