"""Project hygiene: dependency sets agree, ignores cover data and credentials, CI runs `make test`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _environment_pip() -> dict[str, str]:
    """environment.yml's pip requirements by package name (the editable install of the project left out)."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_name(r): r.replace(" ", "") for r in pip_deps if not r.startswith("-e")}


def _makefile_torch_pins() -> dict[str, str]:
    """The Makefile's TORCH pins (what `make install` installs), by package name."""
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if re.match(r"TORCH\s*\??=", l))
    return {_name(r): r for r in line.split("=", 1)[1].split()}


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    extras = {_name(r): r.replace(" ", "") for group in project["optional-dependencies"].values() for r in group}
    in_env = _environment_pip()
    pinned = _makefile_torch_pins()
    # runtime, test and browser dependencies alike; torch and torchvision pinned as `make install` pins them
    assert in_env == (declared | extras) | pinned
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    # The tests read pyproject with tomllib (3.11+): the floor must be what actually runs.
    assert project["requires-python"] == ">=3.11" and python == "python=3.11"
    assert {"ipywidgets", "pytest", "playwright"} <= set(in_env)
    for required in ("torch", "torchvision", "jupyterlab", "papermill", "matplotlib", "seaborn",
                     "pandas", "pillow", "kaggle"):
        assert required in declared


def test_environment_yml_pins_what_make_install_pins() -> None:
    """A conda env made from environment.yml gets the torch and torchvision `make install` installs, and
    the pins lie inside pyproject's ranges."""
    from packaging.requirements import Requirement

    pinned = _makefile_torch_pins()
    assert set(pinned) == {"torch", "torchvision"} and all("==" in r for r in pinned.values())
    in_env = _environment_pip()
    assert {name: in_env[name] for name in pinned} == pinned
    ranges = {_name(r): Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
              ["project"]["dependencies"]}
    for name, pin in pinned.items():
        version = pin.split("==", 1)[1]
        assert ranges[name].specifier.contains(version), f"{pin} is outside pyproject's {ranges[name]}"


_ENV_VARS = ("VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV")


def _make_dry_run(target: str, **env_vars: str) -> list[str]:
    """The commands `make -n -B TARGET` would run, with only the given environment variables of _ENV_VARS set.

    -B: as on a fresh machine, whether or not this checkout already has an installed .venv (CI has, by now)."""
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and k not in ("VENV", "PY", "MAKEFLAGS")}
    env.update(env_vars)
    proc = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if not line.startswith("make")]


@pytest.mark.parametrize("env_vars", [{"VIRTUAL_ENV": "venv"},
                                      {"CONDA_PREFIX": "conda/envs/lungs", "CONDA_DEFAULT_ENV": "lungs"}],
                         ids=["virtualenv", "conda"])
def test_make_uses_the_active_environment(tmp_path: Path, env_vars: dict[str, str]) -> None:
    """With a virtual env or a conda env active, `make install` installs into it (torch pinned) and every
    target runs its python; no .venv is made."""
    env_vars = {k: (str(tmp_path / v) if k != "CONDA_DEFAULT_ENV" else v) for k, v in env_vars.items()}
    prefix = env_vars.get("VIRTUAL_ENV") or env_vars["CONDA_PREFIX"]
    python = f"{prefix}/bin/python"
    torch_pins = " ".join(_makefile_torch_pins().values())
    for target, runs in (("demo", f"{python} -m lungs_utils demo"), ("test", f"{python} -m pytest"),
                         ("lab", f"{prefix}/bin/jupyter lab"), ("tensorboard", f"{prefix}/bin/tensorboard")):
        lines = _make_dry_run(target, **env_vars)
        text = "\n".join(lines)
        assert any(line.startswith(runs) for line in lines), text
        assert f"{python} -m pip install --quiet --disable-pip-version-check {torch_pins}" in text
        assert f"{python} -m pip install --quiet --disable-pip-version-check -e '.[dev]'" in text
        assert ".venv" not in text and "-m venv" not in text, text
    assert not (tmp_path / "venv").exists() and not (tmp_path / "conda").exists()  # a dry run writes nothing


@pytest.mark.parametrize("env_vars", [{}, {"CONDA_PREFIX": "/opt/conda", "CONDA_DEFAULT_ENV": "base"}],
                         ids=["none", "conda-base"])
def test_make_builds_its_own_venv_without_an_active_environment(tmp_path: Path, env_vars: dict[str, str]) -> None:
    """No environment active (or only conda's base, which is not for projects): .venv, made on first use."""
    venv_python = str(ROOT / ".venv" / "bin" / "python")
    lines = _make_dry_run("demo", **env_vars)
    text = "\n".join(lines)
    assert f"test -x {venv_python} || python3 -m venv .venv" in text
    assert f"{venv_python} -m pip install --quiet --disable-pip-version-check " \
           f"{' '.join(_makefile_torch_pins().values())}" in text
    assert lines[-1] == f"{venv_python} -m lungs_utils demo"
    assert "/opt/conda" not in text


def test_console_script_and_module_entry() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lungs"] == "lungs_utils.app.cli:main"
    assert (ROOT / "lungs_utils" / "__main__.py").is_file()


def test_gitignore_covers_data_outputs_and_credentials() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in ("data/", "outputs/*", ".venv/", "kaggle.json", "access_token", "checkpoints/"):
        assert pattern in ignored


def test_ci_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in script and "make test-faults\n" in script and "make test-browser" in script


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.find("\n## ", readme.find("make test"))]
    assert "make demo" in head and "make test" in head


def test_package_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = ("import sys, lungs_utils, lungs_utils.xrays.data, lungs_utils.app.cli; "
            "import torch; print(torch.get_default_device()); "
            "print('kaggle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "False"]


# A path into the suite's own folders, as notebooks, the README, params comments and docstrings name them.
_REFERENCE = re.compile(r"(?<![\w./-])((?:params|notebooks|docs)/[\w./*<>-]*\w(?:\.(?:yaml|ipynb|md|png|py))?)")


def _references() -> list[tuple[str, str]]:
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
               *sorted((ROOT / "params").rglob("*.yaml")), *sorted((ROOT / "lungs_utils").rglob("*.py")),
               *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "docs").glob("*.py")), ROOT / "Makefile"]
    found = []
    for source in sources:
        for ref in _REFERENCE.findall(source.read_text(encoding="utf-8")):
            stem = Path(ref).stem
            if "<" in ref or len(stem) == 1:  # placeholders: params/<file>.yaml, params/x.yaml
                continue
            found.append((str(source.relative_to(ROOT)), ref))
    return found


def test_every_path_the_suite_names_exists() -> None:
    refs = _references()
    assert len(refs) > 50  # the scan does find the references
    missing = sorted({f"{where}: {ref}" for where, ref in refs
                      if not (list(ROOT.glob(ref)) if "*" in ref else (ROOT / ref).exists())})
    assert not missing, "named but absent:\n" + "\n".join(missing)


def test_every_param_is_read_somewhere() -> None:
    """No dead params keys: each one is used by the package or a notebook."""
    from lungs_utils.params import SCHEMA

    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "lungs_utils").rglob("*.py")
                        if p.name != "params.py")
    sources += "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "notebooks").glob("*.ipynb"))
    unused = [k for k in SCHEMA if not re.search(rf"""["']{k}["']|\\"{k}\\"|\b{k} ?=|\.{k}\b""", sources)]
    assert not unused, f"params nothing reads: {unused}"
