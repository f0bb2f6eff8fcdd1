"""Kaggle notebook bundles: metadata, the baked notebook, atomic writing, push, and a real execution.

The network boundary is the only thing replaced (``KaggleApi.authenticate`` / ``kernels_push``, or
the SDK client under the real ``kernels_push``). The slow test executes the bundled notebook with
papermill in a separate process that sees no ``lungs_utils`` but the copy embedded in the notebook.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import snapshot
from lungs_utils import COMPETITION
from lungs_utils.competition import bundle as B
from lungs_utils import params as params_mod
from lungs_utils.errors import DataWarning, LungsError

PACKAGE = Path(B.__file__).resolve().parents[1]  # lungs_utils/
SMOKE = {"notebook": "10_simple_cnn.ipynb", "run_name": "kaggle_smoke", "model": "simple_cnn",
         "image_size": 32, "epochs": 1, "batch_size": 8, "device": "cpu", "tta": False, "seed": 0}


def write_params(folder: Path, **changes) -> Path:
    path = folder / "smoke.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**SMOKE, **changes}.items()))
    return path


def run_as_on_kaggle(out: Path, meta: dict, tmp_path: Path, kaggle_input: Path) -> tuple[Path, Path, Path]:
    """Execute a bundle's notebook the way Kaggle does: its own working folder, the competition mounted at
    ``kaggle_input``, no checkout on ``PYTHONPATH``. Returns (working folder, outputs, executed notebook)."""
    work, outputs = tmp_path / "working", tmp_path / "outputs"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LUNGS_HOME", "LUNGS_DATA_DIR", "LUNGS_CACHE_DIR") and not k.startswith("KAGGLE_")}
    env.update(LUNGS_KAGGLE_INPUT=str(kaggle_input), LUNGS_OUTPUTS=str(outputs), MPLBACKEND="Agg")
    executed = tmp_path / "executed.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(out / meta["code_file"]), str(executed),
                           "--cwd", str(work), "-k", "python3", "--log-level", "ERROR"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, outputs, executed


def read_bundle(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / B.METADATA_FILE).read_text())
    return meta, json.loads((folder / meta["code_file"]).read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def assignments(code: str) -> dict:
    """``name = literal`` statements of a cell, evaluated as literals (no exec)."""
    out = {}
    for node in ast.parse(code).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


# --------------------------------------------------------------------------------------------------
# Metadata and notebook
# --------------------------------------------------------------------------------------------------
def test_metadata_is_valid_for_kaggle(tmp_path: Path) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi
    from slugify import slugify  # what the kaggle package compares the slug with

    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "bundle", user="alice")
    assert out == (tmp_path / "bundle").resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted([B.METADATA_FILE, "10_simple_cnn.ipynb"])
    meta, _ = read_bundle(out)
    assert meta == {
        "id": "alice/lungs-kaggle-smoke", "title": "lungs kaggle_smoke", "code_file": "10_simple_cnn.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_tpu": False, "enable_internet": False, "dataset_sources": [],
        "competition_sources": [COMPETITION], "kernel_sources": [], "model_sources": [],
    }
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        assert isinstance(meta[key], bool)
    user, slug = meta["id"].split("/")
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug) and 5 <= len(slug) <= 50
    assert slugify(meta["title"]) == slug  # else `kernels push` warns of "surprising behavior"
    api = KaggleApi()
    api.validate_kernel_string(meta["id"])
    assert meta["language"] in api.valid_push_language_types
    assert meta["kernel_type"] in api.valid_push_kernel_types
    assert (out / meta["code_file"]).is_file()


def test_notebook_has_the_baked_parameters_and_the_package(tmp_path: Path) -> None:
    import nbformat

    params_file = write_params(tmp_path / "p", data_dir=str(tmp_path), cache_dir="cache")
    with pytest.warns(DataWarning, match="data_dir, cache_dir set to null"):
        out = B.kernel_bundle(params_file, tmp_path / "bundle", user="alice", overrides=["lr=0.01"])
    _, nb = read_bundle(out)
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
    original = json.loads((PACKAGE.parent / "notebooks" / "10_simple_cnn.ipynb").read_text())
    assert nb["metadata"]["kernelspec"] == original["metadata"]["kernelspec"]
    assert nb["metadata"]["language_info"]["name"] == "python"
    assert len(nb["cells"]) == len(original["cells"]) + 1

    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    baked = assignments(source(tagged[0]))
    expected = params_mod.load(params_file, ["lr=0.01"])
    expected.update(data_dir=None, cache_dir=None, output_dir=None, time_limit=B.KAGGLE_TIME_LIMIT)
    assert baked == expected  # a time_limit below Kaggle's session unless the params give one
    assert baked["image_size"] == 32 and baked["lr"] == 0.01 and baked["data_dir"] is None

    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[0]["metadata"]["tags"] == [B.BOOTSTRAP_TAG]  # runs before everything else
    assert code[1] is tagged[0]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    boot = source(code[0])
    assert "sys.path.insert(0," in boot and 'os.environ.setdefault("LUNGS_OUTPUTS"' in boot
    blob = re.search(r'_lungs_zip = "([A-Za-z0-9+/=]+)"', boot).group(1)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(blob))) as zf:
        names = set(zf.namelist())
        assert zf.read("lungs_utils/competition/bundle.py") == (PACKAGE / "competition" / "bundle.py").read_bytes()
    expected_names = {f"lungs_utils/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")
                      if "__pycache__" not in p.parts}
    assert names == expected_names
    assert "lungs_utils/models/__init__.py" in names
    assert all(n.endswith(".py") and "__pycache__" not in n for n in names)


def test_archive_is_deterministic() -> None:
    assert B.package_archive() == B.package_archive()


@pytest.mark.parametrize("how", ["env", "json"])
def test_user_from_credentials(isolated_env: Path, tmp_path: Path, monkeypatch, how: str) -> None:
    if how == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "bob")
    else:
        (isolated_env / ".kaggle").mkdir()
        (isolated_env / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "bob", "key": "k"}))
    meta, _ = read_bundle(B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b"))
    assert meta["id"] == "bob/lungs-kaggle-smoke"
    meta, _ = read_bundle(B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b", user="carol"))
    assert meta["id"] == "carol/lungs-kaggle-smoke"  # an explicit user wins


def test_no_user_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LungsError, match=r"no Kaggle user name.*--user") as exc:
        B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "b").exists()


def test_slug_title_and_flags(tmp_path: Path) -> None:
    p = write_params(tmp_path / "p")
    meta, _ = read_bundle(B.kernel_bundle(p, tmp_path / "b1", user="u", title="Lungs: Simple CNN (v2)",
                                          gpu=False, internet=True, private=False))
    assert meta["id"] == "u/lungs-simple-cnn-v2" and meta["title"] == "Lungs: Simple CNN (v2)"
    assert (meta["enable_gpu"], meta["enable_internet"], meta["is_private"]) == (False, True, False)
    meta, _ = read_bundle(B.kernel_bundle(p, tmp_path / "b2", user="u", slug="my-xray-run"))
    assert meta["id"] == "u/my-xray-run" and meta["title"] == "my xray run"
    with pytest.raises(LungsError, match="Kaggle derives the slug from the title"):
        B.kernel_bundle(p, tmp_path / "b3", user="u", slug="other-slug", title="Some Title")
    with pytest.raises(LungsError, match="5 to 50"):
        B.kernel_bundle(p, tmp_path / "b3", user="u", slug="ab")
    with pytest.raises(LungsError, match="5 to 50"):
        B.kernel_bundle(p, tmp_path / "b3", user="u", slug="Bad_Slug")
    with pytest.raises(LungsError, match="needs a GPU"):
        B.kernel_bundle(write_params(tmp_path / "q", device="cuda"), tmp_path / "b3", user="u", gpu=False)
    assert not (tmp_path / "b3").exists()


@pytest.mark.parametrize("problem, match", [
    ("model", r"unknown model 'nope'"),
    ("key", r"unknown key 'epoch'"),
    ("notebook", r"'missing.ipynb' not found"),
])
def test_bad_params_write_nothing(tmp_path: Path, problem: str, match: str) -> None:
    p = write_params(tmp_path / "p")
    overrides = {"model": ["model=nope"], "key": ["epoch=2"], "notebook": ["notebook=missing.ipynb"]}[problem]
    with pytest.raises(LungsError, match=match):
        B.kernel_bundle(p, tmp_path / "b", user="u", overrides=overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_refuses_a_foreign_folder_and_replaces_a_previous_bundle(tmp_path: Path) -> None:
    p = write_params(tmp_path / "p")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    with pytest.raises(LungsError, match="not empty"):
        B.kernel_bundle(p, foreign, user="u")
    assert snapshot(foreign) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    B.kernel_bundle(p, empty, user="u")
    assert B.is_bundle(empty)

    out = B.kernel_bundle(p, tmp_path / "b", user="u")
    (out / ".ipynb_checkpoints").mkdir()  # opened in JupyterLab: still a bundle
    B.kernel_bundle(p, out, user="u", overrides=["epochs=7"])
    assert not (out / ".ipynb_checkpoints").exists()
    _, nb = read_bundle(out)
    tagged = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert assignments(source(tagged))["epochs"] == 7
    # No temporary folders are left beside it.
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b", "empty", "foreign", "p"]


def test_params_path_relative_to_the_suite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the suite's params/ is still found, as for `lungs run`
    out = B.kernel_bundle("params/10_simple_cnn.yaml", "bundle", user="u")
    assert out == (tmp_path / "bundle").resolve()
    meta, nb = read_bundle(out)
    assert meta["code_file"] == "10_simple_cnn.ipynb"


# --------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def credentials(monkeypatch):
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    monkeypatch.setattr(KaggleApi, "authenticate", lambda self: None)


def test_push_calls_kernels_push_with_the_folder(tmp_path: Path, credentials, monkeypatch) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelResponse

    calls: list[tuple] = []

    def fake_push(self, folder, timeout=None, acc=None, no_run=False):
        calls.append((folder, timeout, acc, no_run))
        response = ApiSaveKernelResponse()
        response.url = "https://www.kaggle.com/code/alice/lungs-kaggle-smoke"
        response.version_number = 3
        return response

    monkeypatch.setattr(KaggleApi, "kernels_push", fake_push)
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b")
    line = B.push_kernel(out)
    assert calls == [(str(out), None, None, False)]
    assert line.startswith("pushed alice/lungs-kaggle-smoke version 3;")
    assert "https://www.kaggle.com/code/alice/lungs-kaggle-smoke" in line and "\n" not in line


@pytest.mark.parametrize("reply, match", [
    (SimpleNamespace(error="Notebook not found", url="", version_number=None), "Kaggle refused the notebook"),
    (OSError("500 Server Error"), r"Kaggle notebook push failed \(500 Server Error\)"),
    (ValueError("Title must be at least five characters"), r"kernel-metadata.json: Title must be"),
    (None, "without a reply"),
])
def test_push_failures_are_one_line(tmp_path: Path, credentials, monkeypatch, reply, match) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi

    def fake_push(self, folder, timeout=None, acc=None, no_run=False):
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(KaggleApi, "kernels_push", fake_push)
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b")
    with pytest.raises(LungsError, match=match) as exc:
        B.push_kernel(out)
    assert "\n" not in str(exc.value)


def test_push_checks_the_folder_before_credentials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)
    with pytest.raises(LungsError, match="has no kernel-metadata.json"):
        B.push_kernel(tmp_path)
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b", user="u")
    (out / "10_simple_cnn.ipynb").unlink()
    with pytest.raises(LungsError, match="code_file '10_simple_cnn.ipynb' is not in"):
        B.push_kernel(out)
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b", user="u")
    with pytest.raises(LungsError, match="no Kaggle credentials, needed to push the notebook"):
        B.push_kernel(out)
    assert "kaggle" not in sys.modules


def test_real_kernels_push_accepts_the_bundle(tmp_path: Path, credentials, monkeypatch) -> None:
    """The package's own ``kernels_push`` validates the folder and builds the request; only the SDK
    client (the HTTP layer) is replaced."""
    import contextlib

    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelResponse

    requests: list = []

    def save_kernel(request):
        requests.append(request)
        response = ApiSaveKernelResponse()
        response.url, response.version_number = "https://www.kaggle.com/code/alice/lungs-kaggle-smoke", 1
        return response

    client = SimpleNamespace(kernels=SimpleNamespace(kernels_api_client=SimpleNamespace(save_kernel=save_kernel)))
    monkeypatch.setattr(KaggleApi, "build_kaggle_client", lambda self: contextlib.nullcontext(client))
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b")
    assert "version 1" in B.push_kernel(out)
    (request,) = requests
    assert request.slug == "alice/lungs-kaggle-smoke"
    assert request.new_title == "lungs kaggle_smoke"
    assert (request.language, request.kernel_type) == ("python", "notebook")
    assert request.competition_data_sources == [COMPETITION]
    assert (request.enable_gpu, request.enable_internet, request.is_private) == (True, False, True)
    sent = json.loads(request.text)
    assert any(B.BOOTSTRAP_TAG in c["metadata"].get("tags", []) for c in sent["cells"])


# --------------------------------------------------------------------------------------------------
# Execution in a clean environment
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("gpus", "cv"), [(1, None), (2, 2)])
def test_bundled_notebook_runs_with_the_embedded_package(tmp_path: Path, gpus: int, cv: int | None) -> None:
    """gpus=2: the notebook for Kaggle's "GPU T4 x2", whose training cell runs torchrun with two
    processes; here on a CPU, with gloo, at tiny size. cv=2: every fold trained in the one kernel (under
    torchrun), each fold's time and the time left printed as it goes. (torchrun on one split is
    tests/test_distributed.py's; a kernel launch costs CI half a minute, so the two-GPU case runs once.)"""
    from lungs_utils.xrays import phantom
    from lungs_utils.xrays.data import list_images
    from lungs_utils.xrays.submission import validate_submission

    # The competition data at a fake Kaggle mount, in the layout Kaggle uses today.
    kaggle_input = tmp_path / "kaggle_input"
    summary = phantom.generate(kaggle_input / "competitions" / COMPETITION, n_train=36, n_test=9, size=32,
                               workers=1)
    data = Path(summary["data_dir"])
    out = B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "bundle", user="alice", gpus=gpus,
                          overrides=[f"cv={cv}"] if cv else [])
    meta, bundled = read_bundle(out)
    assert (meta.get("machine_shape") == B.TWO_GPU_SHAPE) == (gpus == 2)
    train_cell = next(source(c) for c in bundled["cells"] if B.TRAIN_CALL in source(c))
    assert ("--nproc_per_node=2" in train_cell) == (gpus == 2)

    work, outputs, executed = run_as_on_kaggle(out, meta, tmp_path, kaggle_input)

    # lungs_utils came from the copy the first cell unpacked, not from the editable install.
    nb = json.loads(executed.read_text())
    boot = next(c for c in nb["cells"] if B.BOOTSTRAP_TAG in c["metadata"].get("tags", []))
    boot_out = "".join("".join(o.get("text", "")) for o in boot["outputs"])
    embedded = work / B.PACKAGE_DIR / "lungs_utils" / "__init__.py"
    assert f"from {embedded}" in boot_out, boot_out
    assert str(PACKAGE) not in json.dumps(nb)  # no module of the checkout was ever named

    run = outputs / "kaggle_smoke"
    for name in ("params.yaml", "metrics.json", "history.csv", "val_predictions.csv", "submission.csv"):
        assert (run / name).is_file(), name
    assert params_mod.read_yaml(run / "params.yaml")["image_size"] == 32
    test_ids = sorted(list_images(data / "test_images"))
    assert len(validate_submission(run / "submission.csv", test_ids)) == 9
    # Discovery found the fake Kaggle mount (the only data this process could see).
    split = pd.read_csv(run / "split.csv")
    assert set(split["id"]) == set(list_images(data / "train_images"))
    if cv:  # the folds were trained in this kernel: sub-runs, out-of-fold predictions, times per fold
        out_text = json.dumps(nb)
        assert "fold_0 (1 of 2)" in out_text and "min for the 1 fold(s) left" in out_text
        assert len(pd.read_csv(run / "oof_predictions.csv")) == len(split) == 36
        assert all((run / f"fold_{k}" / "checkpoints" / "best.pt").is_file() for k in range(2))
        assert json.loads((run / "metrics.json").read_text())["cv"]["k"] == 2
    if gpus == 2:  # trained by two processes, then shown by the notebook as usual
        log = (run / "torchrun.log").read_text()
        assert "val macro-F1" in log, log[-2000:]
        out_text = json.dumps(nb)
        assert "torch.distributed.run --standalone --nproc_per_node=2" in out_text
        assert (run / "plots" / "learning_curves.png").is_file() and (run / "plots" / "confusion_matrix.png").is_file()


def test_two_gpus_need_a_classifier_notebook_and_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(LungsError, match="needs a classifier notebook"):
        B.kernel_bundle(write_params(tmp_path / "p", notebook="00_data.ipynb"), tmp_path / "b", user="alice", gpus=2)
    with pytest.raises(LungsError, match="contradict"):
        B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b", user="alice", gpus=2, gpu=False)
    with pytest.raises(LungsError, match="one GPU or two"):
        B.kernel_bundle(write_params(tmp_path / "p"), tmp_path / "b", user="alice", gpus=4)


def test_a_sweep_bundle_carries_its_recipe_and_runs_its_trials_with_the_embedded_package(tmp_path: Path) -> None:
    """97_sweep on Kaggle: every trial is a notebook run in its own kernel, which must find the recipe's
    notebook, params and space and import the unpacked package (nothing of this checkout)."""
    from lungs_utils.runs import sweep
    from lungs_utils.xrays import phantom

    kaggle_input = tmp_path / "kaggle_input"
    phantom.generate(kaggle_input / "competitions" / COMPETITION, n_train=36, n_test=9, size=32, workers=1)
    recipe = write_params(tmp_path / "local", run_name="tiny", data_dir=str(tmp_path / "nowhere"), epochs=2)
    space = tmp_path / "local" / "lr_only.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 3.0e-3, log: true}\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"notebook: 97_sweep.ipynb\nrun_name: kaggle_sweep\nbase_params: {recipe}\n"
                          f"space: {space}\ntrials: 2\npruner: none\n")
    out = B.kernel_bundle(sweep_file, tmp_path / "bundle", user="alice")
    meta, bundled = read_bundle(out)
    baked = assignments(next(source(c) for c in bundled["cells"] if "parameters" in c["metadata"].get("tags", [])
                             ).split("\n", 3)[3])
    assert (baked["base_params"], baked["space"], baked["data_dir"]) == ("smoke.yaml", "sweep/lr_only.yaml", None)

    _, outputs, _ = run_as_on_kaggle(out, meta, tmp_path, kaggle_input)
    trials = pd.read_csv(outputs / "kaggle_sweep" / sweep.TRIALS_FILE)
    assert sorted(trials["state"]) == ["complete", "complete"]
    for k in range(2):  # each trial a run of the bundled recipe (smoke.yaml exists nowhere else) on the mount
        run = outputs / f"kaggle_sweep-t00{k}"
        assert params_mod.read_yaml(run / "params.yaml")["epochs"] == 2 and (run / "submission.csv").is_file()
        assert str(PACKAGE) not in (run / "10_simple_cnn.ipynb").read_text()
    assert (outputs / "kaggle_sweep" / sweep.BEST_FILE).is_file()
