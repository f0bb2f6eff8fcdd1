"""Security: credentials never reach outputs, code never evaluates strings or unpickles untrusted files,
and git never picks up credentials or data.

- End to end (slow): ``lungs run`` of a real model notebook, ``lungs train``, ``lungs leaderboard``,
  ``lungs report`` and ``lungs kaggle-kernel`` with fake Kaggle credentials in every place the ``kaggle``
  package reads them (env ``KAGGLE_USERNAME``/``KAGGLE_KEY``/``KAGGLE_API_TOKEN`` and a ``kaggle.json`` in
  ``KAGGLE_CONFIG_DIR``); then every byte written (run folders, executed notebooks, run.json, checkpoints,
  caches, report, console logs) is searched for the secrets.
- Static (fast): the package and the notebooks are parsed with :mod:`ast` (no regex guessing) for
  ``eval``/``exec``, ``torch.load`` without ``weights_only=True`` and other ways to run code from data.
- ``.gitignore`` is checked with git's own matcher (``git check-ignore``) on real paths.

Checks that exist elsewhere and are not repeated here: the pattern list of .gitignore
(test_project.py::test_gitignore_covers_data_outputs_and_credentials) and that ``load_checkpoint`` calls
``torch.load(weights_only=True)`` at run time (test_train.py::test_checkpoint_round_trip_with_weights_only).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from lungs_utils.xrays import phantom

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lungs_utils"

# Distinctive fake secrets, one per place credentials can come from.
ENV_USER, ENV_KEY = "sec-env-user-q7x2", "5ec7e7a1b2c3d4e5f60718293a4b5c6d"
JSON_USER, JSON_KEY = "sec-json-user-k9w4", "f00dfeedc0ffee0123456789abcdef01"
API_TOKEN = "KGAT_sec0token0aa11bb22cc33dd44ee55"
SECRETS = {"KAGGLE_USERNAME": ENV_USER, "KAGGLE_KEY": ENV_KEY, "kaggle.json username": JSON_USER,
           "kaggle.json key": JSON_KEY, "KAGGLE_API_TOKEN": API_TOKEN}
KEYS = {k: v for k, v in SECRETS.items() if "USER" not in k.upper()}
TINY = ("-p", "image_size=32", "-p", "epochs=1", "-p", "batch_size=8", "-p", "tta=false", "-p", "device=cpu")


# ------------------------------------------------------------------------------------------------ helpers
def _blobs(data: bytes, where: str) -> Iterator[tuple[str, bytes]]:
    """The bytes, plus each member decompressed when they are a zip (torch checkpoints, archives)."""
    yield where, data
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                yield f"{where}!{name}", zf.read(name)


def _file_blobs(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    for path in files:
        yield from _blobs(path.read_bytes(), str(path))


def _leaks(blobs: Iterator[tuple[str, bytes]], secrets: dict[str, str]) -> list[str]:
    found = []
    for where, data in blobs:
        for what, value in secrets.items():
            # As written (UTF-8) and as UTF-16 (what some binary formats use for strings).
            if value.encode() in data or value.encode("utf-16-le") in data:
                found.append(f"{what} in {where}")
    return found


def _files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def credentials(isolated_env: Path, tmp_path: Path) -> dict[str, str]:
    """An environment for subprocesses with fake credentials in every place the kaggle package looks."""
    config = tmp_path / "kaggle-config"  # outside the project root: the only place the secrets may be
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": JSON_USER, "key": JSON_KEY}))
    (config / "kaggle.json").chmod(0o600)
    return {**os.environ, "KAGGLE_USERNAME": ENV_USER, "KAGGLE_KEY": ENV_KEY, "KAGGLE_API_TOKEN": API_TOKEN,
            "KAGGLE_CONFIG_DIR": str(config), "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "plain"}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_credentials_never_reach_outputs_notebooks_run_json_or_logs(isolated_env: Path, tmp_path: Path,
                                                                    credentials: dict[str, str]) -> None:
    home = isolated_env
    phantom.generate(home / "data" / "phantom", n_train=24, n_test=6, size=32, seed=5)
    logs: list[tuple[str, bytes]] = []

    def lungs(*args: str) -> subprocess.CompletedProcess[bytes]:
        out = subprocess.run([sys.executable, "-m", "lungs_utils", *args], capture_output=True,
                             env=credentials, cwd=home, timeout=600)
        logs.extend([(f"stdout of lungs {' '.join(args)}", out.stdout),
                     (f"stderr of lungs {' '.join(args)}", out.stderr)])
        assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
        return out

    # A real model notebook through papermill: executed notebook, run.json, params.yaml, plots, checkpoints.
    lungs("run", str(ROOT / "params" / "demo" / "15_resnet_tiny.yaml"), "-p", "run_name=sec_run", *TINY)
    # The same training without papermill (console log only), then the files that gather runs.
    lungs("train", str(ROOT / "params" / "demo" / "15_resnet_tiny.yaml"), "-p", "run_name=sec_train", *TINY)
    lungs("leaderboard")
    lungs("report")
    # A Kaggle bundle names the user (its id is <user>/<slug>: by design) but must hold no key.
    lungs("kaggle-kernel", str(ROOT / "params" / "demo" / "15_resnet_tiny.yaml"), "--out", str(tmp_path / "bundle"),
          "-p", "run_name=sec_bundle")

    outputs = home / "outputs"
    run_dir = outputs / "sec_run"
    for name in ("15_modern.ipynb", "run.json", "params.yaml", "metrics.json", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name  # the search below covers real files
    assert (outputs / "sec_train" / "checkpoints" / "last.pt").is_file()
    assert (outputs / "report" / "index.html").is_file()

    # Everything under the project root (outputs, data, caches) and every console log: no secret at all.
    written = _files(home)
    assert len(written) > 20
    leaks = _leaks(_file_blobs(written), SECRETS)
    leaks += _leaks(iter(logs), SECRETS)
    assert not leaks, leaks
    # Controls: the search does see the secrets where they are, and strings inside checkpoints.
    assert len(_leaks(_file_blobs([Path(credentials["KAGGLE_CONFIG_DIR"]) / "kaggle.json"]), SECRETS)) == 2
    assert _leaks(_file_blobs([run_dir / "checkpoints" / "last.pt"]), {"run name": "sec_run"})

    # The bundle: the user name from the environment in the id, no key anywhere, also not inside the
    # embedded package archive (decoded from the notebook's base64 cell).
    bundle = tmp_path / "bundle"
    meta = json.loads((bundle / "kernel-metadata.json").read_text())
    assert meta["id"] == f"{ENV_USER}/lungs-sec-bundle"
    blobs = list(_file_blobs(_files(bundle)))
    nb = nbformat.read(str(bundle / meta["code_file"]), as_version=4)
    for cell in nb.cells:
        for encoded in re.findall(r'"([A-Za-z0-9+/=]{2000,})"', cell.source):
            blobs += list(_blobs(base64.b64decode(encoded), f"{meta['code_file']}: embedded archive"))
    assert any("embedded archive" in where for where, _ in blobs)
    assert not _leaks(iter(blobs), KEYS)


# ------------------------------------------------------------------------------------------------ static
def _package_sources() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))]


def _notebook_sources() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            # IPython magics and shell escapes are not Python: blank them, keep line numbers.
            code = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in cell.source.splitlines())
            out.append((f"{path.relative_to(ROOT)} cell {i}", ast.parse(code)))
    return out


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for Attribute(Name('torch'), 'load'); '' for anything not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every call that could run code taken from a string or a file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "marshal", "shelve"):
            # ``from torch import load`` would hide torch.load calls from the check below.
            for alias in node.names:
                if node.module != "torch" or alias.name == "load":
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("pickle", "dill", "marshal", "shelve", "cloudpickle"):
                    found.append((node.lineno, f"import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        short = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__", "compile"):
            found.append((node.lineno, f"{name}()"))
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load() without weights_only=True"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append((node.lineno, f"{name}() (use yaml.safe_load)"))
        elif short == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
        elif name.split(".")[0] == "subprocess" and _is_true(_keyword(node, "shell")):
            found.append((node.lineno, f"{name}(shell=True)"))
        elif name in ("os.system", "os.popen"):
            found.append((node.lineno, f"{name}()"))
    return sorted(found)


def test_the_checker_finds_what_it_looks_for() -> None:
    bad = ast.parse("import torch, yaml, numpy as np, subprocess\n"
                    "eval('1')\nexec('x = 1')\ntorch.load('a.pt')\ntorch.load('a.pt', weights_only=False)\n"
                    "yaml.load(s)\nnp.load('a.npy', allow_pickle=True)\nsubprocess.run('ls', shell=True)\n"
                    "from torch import load\nimport pickle\n")
    whats = [what for _, what in unsafe_calls(bad)]
    assert whats == ["eval()", "exec()", "torch.load() without weights_only=True",
                     "torch.load() without weights_only=True", "yaml.load() (use yaml.safe_load)",
                     "np.load(allow_pickle=True)", "subprocess.run(shell=True)", "from torch import load",
                     "import pickle"]
    fine = ast.parse("import torch, yaml, ast\ntorch.load(p, map_location='cpu', weights_only=True)\n"
                     "yaml.safe_load(s)\nast.literal_eval(s)\nmodel.eval()\nnet.train().eval()\n")
    assert unsafe_calls(fine) == []


def test_no_eval_exec_or_unsafe_loading_in_the_package() -> None:
    sources = _package_sources()
    assert len(sources) > 20
    problems = [f"{where}:{line}: {what}" for where, tree in sources for line, what in unsafe_calls(tree)]
    assert not problems, problems


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    # Positive form of the check above: the package does load checkpoints, and each call says so.
    calls = [(where, node) for where, tree in _package_sources() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load"]
    assert calls, "no torch.load found: the check would be vacuous"
    assert all(_is_true(_keyword(node, "weights_only")) for _, node in calls)


def test_no_eval_exec_or_unsafe_loading_in_the_notebooks() -> None:
    sources = _notebook_sources()
    assert len(sources) > 20
    problems = [f"{where}:{line}: {what}" for where, tree in sources for line, what in unsafe_calls(tree)]
    assert not problems, problems


# ------------------------------------------------------------------------------------------------ git
IGNORED = ["kaggle.json", "access_token", "access_token.txt", ".kaggle/kaggle.json",
           "notebooks/kaggle.json", "params/access_token",  # anywhere in the tree, not only at the top
           "data/competition/data/train_answers.csv", "data/phantom/data/train_images/img_1.png",
           "data/cache/x/train-0123.npy", "outputs/demo_resnet_tiny/run.json", "outputs/leaderboard.csv",
           "outputs/run/checkpoints/last.pt", ".venv/bin/python"]
KEPT = ["outputs/README.md", "lungs_utils/data.py", "lungs_utils/kaggle.py", "tests/test_data.py",
        "params/demo/15_resnet_tiny.yaml", "notebooks/00_data.ipynb", "README.md", ".gitignore"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gitignore_keeps_credentials_and_data_out_of_git(tmp_path: Path) -> None:
    """Git's own matcher on real paths, in a scratch repository with the project's .gitignore."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    out = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *IGNORED, *KEPT],
                         cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode in (0, 1), out.stderr
    # --verbose --non-matching: "<source>:<line>:<pattern>\t<path>"; "::\t<path>" when no pattern matched,
    # and a "!pattern" when the last match re-includes the path.
    verdict = {}
    for line in out.stdout.splitlines():
        match, path = line.split("\t", 1)
        source, _, pattern = match.split(":", 2)
        verdict[path] = bool(source) and not pattern.startswith("!")
    assert {p for p in IGNORED if not verdict[p]} == set(), "not ignored"
    assert {p for p in KEPT if verdict[p]} == set(), "ignored but must be tracked"
