"""Project hygiene: dependency sets agree, ignores cover data and credentials, CI runs `make test`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    in_env = {_name(r): r.replace(" ", "") for r in pip_deps if not r.startswith("-e")}
    assert in_env == declared
    for required in ("torch", "torchvision", "jupyterlab", "papermill", "matplotlib", "seaborn",
                     "pandas", "pillow", "kaggle"):
        assert required in declared


def test_console_script_and_module_entry() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lungs"] == "lungs_utils.cli:main"
    assert (ROOT / "lungs_utils" / "__main__.py").is_file()


def test_gitignore_covers_data_outputs_and_credentials() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in ("data/", "outputs/*", ".venv/", "kaggle.json", "access_token", "checkpoints/"):
        assert pattern in ignored


def test_ci_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.find("\n## ", readme.find("make test"))]
    assert "make demo" in head and "make test" in head


def test_package_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = ("import sys, lungs_utils, lungs_utils.data, lungs_utils.cli; "
            "import torch; print(torch.get_default_device()); "
            "print('kaggle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "False"]
