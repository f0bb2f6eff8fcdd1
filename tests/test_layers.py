"""The package's shape: every import (those inside functions too, ``TYPE_CHECKING`` blocks aside) points to
the importer's own part or to a lower layer of :data:`lungs_utils.LAYERS`, and no chain of imports comes
back to where it started."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lungs_utils

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lungs_utils"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it sits, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every module of ``package``, function-level
    imports included; ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                froms: list[str] = []
            else:
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module]
                froms = [f"{module}.{a.name}" for a in node.names]
            deps.update(t for t in targets + froms if t in modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def part_of(module: str) -> str:
    if module.endswith(".__main__"):
        return "app"  # `python -m lungs_utils` is the lungs command: the top layer
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in _PARTS and parts[1] != "base"):
        return parts[1]
    return "base"  # the package's own top-level modules and its __init__


_PARTS = {part for layer in lungs_utils.LAYERS for part in layer}
_LEVEL = {part: level for level, layer in enumerate(lungs_utils.LAYERS) for part in layer}


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = part_of(module), part_of(dep)
            if a != b and _LEVEL[b] >= _LEVEL[a]:
                why = "a higher layer" if _LEVEL[b] > _LEVEL[a] else "another part of the same layer"
                bad.append(f"{module} ({a}) imports {dep} ({b}, {why})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------------------------------------ the package
def test_every_part_is_declared_in_one_layer() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == _PARTS - {"base"}, "a subpackage missing from LAYERS, or a part with no folder"
    assert sum(len(layer) for layer in lungs_utils.LAYERS) == len(_PARTS)  # no part in two layers


def test_no_import_points_upward() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150  # the walk does find the imports
    assert upward_edges(graph) == []


def test_no_import_circle_even_inside_functions() -> None:
    assert circles(import_graph(PACKAGE)) == []


# ------------------------------------------------------------------------------------------------ the checker
def test_the_checker_sees_a_circle_hidden_in_functions_and_an_upward_edge(tmp_path: Path) -> None:
    pkg = tmp_path / "lungs_utils"
    for sub in ("", "engine", "runs"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "engine" / "loop.py").write_text("def f():\n    from ..runs import experiment\n")
    (pkg / "runs" / "experiment.py").write_text("from ..engine.loop import f\n")
    (pkg / "paths.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from .runs import experiment\n")
    graph = import_graph(pkg)
    assert graph["lungs_utils.engine.loop"] == {"lungs_utils.runs", "lungs_utils.runs.experiment"}
    assert graph["lungs_utils.paths"] == set()  # for type checking only: not an import at run time
    assert circles(graph) == [["lungs_utils.engine.loop", "lungs_utils.runs.experiment"]]
    assert upward_edges(graph) == [f"lungs_utils.engine.loop (engine) imports {m} (runs, a higher layer)"
                                   for m in ("lungs_utils.runs", "lungs_utils.runs.experiment")]


# ------------------------------------------------------------------------------------------------ old names
def test_the_notebooks_short_names_are_the_modules_themselves() -> None:
    from lungs_utils.runs import experiment as canonical

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notebook API: no warning
        from lungs_utils import data, experiment, plots  # noqa: F401
        import lungs_utils.report as report
    assert experiment is canonical and report.__name__ == "lungs_utils.analysis.report"
    assert report.__spec__.name == "lungs_utils.analysis.report"  # not the alias's


def test_a_moved_module_imports_with_one_line_saying_where_it_went() -> None:
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from lungs_utils.train import fit\nfrom lungs_utils.engine.loop import fit as same\nassert fit is same\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "DeprecationWarning" in ln]
    assert len(lines) == 1 and "lungs_utils.train is now lungs_utils.engine.loop" in lines[0]


@pytest.mark.parametrize("name", sorted({**lungs_utils.NOTEBOOK_MODULES, **lungs_utils.MOVED}))
def test_every_short_name_points_at_a_module(name: str) -> None:
    where = {**lungs_utils.NOTEBOOK_MODULES, **lungs_utils.MOVED}[name]
    assert (PACKAGE / (where.replace(".", "/") + ".py")).is_file()
