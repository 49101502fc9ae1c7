"""The house's floors, checked on the source with ``ast`` (every import statement, module level or not).

Floors, from the ground up (a package imports only packages on its own floor's list):

* ``prune_core``: the vocabulary (ops, spec, cost, plan, AutoPrune math, tokens, manifest, errors, io, ...).
  It imports no other package of the project.
* the stages, one way: calib -> exporter -> graph_passes -> engines (``FORBIDDEN``). calib, the highest
  stage, may import the stages below it; exporter, graph_passes and engines import no other stage (each is
  used by calib or the workflows, never by a sibling). Every stage may import ``prune_core``.
* ``prune_export``: the tool (the CLI and the workflows, the only code that wires stages together). No stage
  and nothing of ``prune_core`` imports it.

The scripts in benchmarks/ and the tests stand above the house and may import any of it. Besides the floors,
no import circle exists among the project's modules (a circle hidden by imports inside functions counts).

Nothing violated these rules when the test was written, so there is no list of exceptions; one added later
must be listed here explicitly, with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "prune_core"
TOOL = "prune_export"
STAGES = ("calib", "exporter", "graph_passes", "engines")
PACKAGES = (CORE, *STAGES, TOOL)
#: Project packages each package must never import. calib is the highest stage: it may import every stage
#: below it. graph_passes never imports engines either, though it is downstream (the workflows connect the
#: two); engines -> graph_passes would point up the arrow. Neither is used today.
FORBIDDEN: dict[str, set[str]] = {
    CORE: {*STAGES, TOOL},
    "calib": {TOOL},
    "exporter": {"calib", "graph_passes", "engines", TOOL},
    "graph_passes": {"calib", "exporter", "engines", TOOL},
    "engines": {"calib", "exporter", "graph_passes", TOOL},
    TOOL: set(),
}


def imported_modules(source: str, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``: ``import``/``from`` statements anywhere
    (functions, ``if TYPE_CHECKING``), and ``importlib.import_module("...")`` / ``__import__("...")`` calls
    with a literal name. Relative imports are resolved against ``module`` (the dotted name of the file, a
    package's ``__init__`` named as the package) when it is given, and left out otherwise."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                if module is None:
                    continue
                parts = module.split(".")
                anchor = parts[: len(parts) - node.level + (1 if _is_package(module) else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base:
                found.append((node.lineno, base))
                found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").is_file()


def _top(module: str) -> str:
    return module.split(".")[0]


def _files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(module: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(package: str, forbidden: tuple[str, ...] | set[str]) -> list[str]:
    """``file:line imports module`` for every import of a module in ``forbidden`` under ``package/``."""
    out: dict[tuple[str, int], str] = {}
    for path in _files(package):
        for line, module in imported_modules(path.read_text(encoding="utf-8"), _module_name(path)):
            if _within(module, forbidden):
                out.setdefault((str(path.relative_to(ROOT)), line), module)  # one entry per statement
    return [f"{file}:{line} imports {module}" for (file, line), module in sorted(out.items())]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_runs_up_a_floor(package: str) -> None:
    violations = _violations(package, FORBIDDEN[package])
    assert not violations, f"{package} imports a package on a higher floor:\n" + "\n".join(violations)


def _module_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (a name resolved to the longest module that
    exists: ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``)."""
    modules = {_module_name(path): path for package in PACKAGES for path in _files(package)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for _, imported in imported_modules(path.read_text(encoding="utf-8"), name):
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle() -> None:
    graph = _module_graph()
    top_graph: dict[str, set[str]] = {}
    for module, edges in graph.items():
        top_graph.setdefault(_top(module), set()).update(_top(e) for e in edges if _top(e) != _top(module))
    assert not _circles(top_graph), f"top-level packages import each other in a circle: {_circles(top_graph)}"
    circles = _circles(graph)
    assert not circles, "modules import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_every_kind_of_import() -> None:
    source = """
import os
import exporter.adapters as adapters
from calib import search
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from graph_passes.census import census
def f():
    from engines.prefill import PrefillRunner
    import importlib
    importlib.import_module("calib.data")
    return __import__("exporter")
from . import sibling
from ..plan import Plan
"""
    modules = {m for _, m in imported_modules(source)}
    assert {_top(m) for m in modules} == {"os", "typing", "importlib", *STAGES}  # relative ones need a module
    assert {"graph_passes.census", "engines.prefill", "calib.data", "exporter"} <= modules
    resolved = {m for _, m in imported_modules(source, "prune_export.workflows.build")}
    assert {"prune_export.workflows.sibling", "prune_export.plan"} <= resolved
    in_init = {m for _, m in imported_modules("from .errors import X", "prune_core")}
    assert "prune_core.errors" in in_init  # a package's __init__ resolves against the package itself


def test_the_checker_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_rules_are_not_vacuous() -> None:
    """The scan covers the CLI and the vocabulary, and the workflows really are where stages are wired."""
    assert ROOT / TOOL / "cli.py" in _files(TOOL)
    assert ROOT / CORE / "plan.py" in _files(CORE)
    assert _violations(f"{TOOL}/workflows", set(STAGES))
    assert _violations("calib", {CORE}) and _violations(TOOL, {CORE})
