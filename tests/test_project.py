"""Project hygiene: dependency sets agree, ignores cover data and credentials, CI runs `make test`."""

from __future__ import annotations

import ast
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
    extras = {_name(r): r.replace(" ", "") for group in project["optional-dependencies"].values() for r in group}
    in_env = {_name(r): r.replace(" ", "") for r in pip_deps if not r.startswith("-e")}
    assert in_env == declared | extras  # runtime, test and browser dependencies alike
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    # The tests read pyproject with tomllib (3.11+): the floor must be what actually runs.
    assert project["requires-python"] == ">=3.11" and python == "python=3.11"
    assert {"ipywidgets", "pytest", "playwright"} <= set(in_env)
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
    assert "make test\n" in script and "make test-browser" in script  # the suite, then the real browser


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


def _top_level_imports(path: Path) -> set[str]:
    """The lungs_utils modules a module imports when it is imported (not inside functions, not for
    type checking only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lungs_utils."):
            found.add(node.module.split(".")[1])
    return found


def test_the_package_has_no_import_circle() -> None:
    """Dependencies point one way (docs/design.md): a circle would make import order matter."""
    package = ROOT / "lungs_utils"
    modules = {p.stem: p for p in package.glob("*.py")}
    modules["models"] = package / "models" / "__init__.py"
    graph = {name: _top_level_imports(path) & set(modules) for name, path in modules.items()}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        for dep in graph[name]:
            assert dep not in trail, f"import circle: {' -> '.join(trail[trail.index(dep):] + (dep,))}"
            visit(dep, trail + (dep,))

    for name in graph:
        visit(name, (name,))
    assert "experiment" not in graph["segmentation"] and "paths" in graph["experiment"]


def test_every_param_is_read_somewhere() -> None:
    """No dead params keys: each one is used by the package or a notebook."""
    from lungs_utils.params import SCHEMA

    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "lungs_utils").rglob("*.py")
                        if p.name != "params.py")
    sources += "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "notebooks").glob("*.ipynb"))
    unused = [k for k in SCHEMA if not re.search(rf"""["']{k}["']|\\"{k}\\"|\b{k} ?=|\.{k}\b""", sources)]
    assert not unused, f"params nothing reads: {unused}"
