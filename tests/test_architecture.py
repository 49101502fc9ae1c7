"""The import rule, checked on the source with ``ast`` (every import statement, module level or not).

* The core package ``prune_export`` never imports a stage (calib, exporter, graph_passes, engines) outside
  ``prune_export/workflows/``: the CLI calls workflows, workflows call stages.
* Stages import one way, calib -> exporter -> graph_passes -> engines (``FORBIDDEN``): calib, the top, may
  import the stages below it; exporter, graph_passes and engines import no other stage (each is used by
  calib or the workflows, never by a sibling). No stage imports the CLI or the workflows.

Nothing violated these rules when the test was written, so there is no list of exceptions; one added later
must be listed here explicitly, with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("calib", "exporter", "graph_passes", "engines")
#: Stage packages each stage must never import. calib is the top: it may import every stage below it.
#: graph_passes never imports engines either, though it is downstream (the workflows connect the two);
#: engines -> graph_passes would point up the arrow. Neither is used today.
FORBIDDEN = {
    "calib": set(),
    "exporter": {"calib", "graph_passes", "engines"},
    "graph_passes": {"calib", "exporter", "engines"},
    "engines": {"calib", "exporter", "graph_passes"},
}
#: Core modules no stage may import (they sit above every stage).
CORE_TOP = ("prune_export.cli", "prune_export.workflows")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``: ``import``/``from`` statements anywhere
    (functions, ``if TYPE_CHECKING``), and ``importlib.import_module("...")`` / ``__import__("...")`` calls
    with a literal name. Relative imports stay inside their own package and are left out."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def _within(module: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(package: str, forbidden: tuple[str, ...] | set[str], skip: Path | None = None) -> list[str]:
    """``file:line imports module`` for every import of a module in ``forbidden`` under ``package/``."""
    out: dict[tuple[str, int], str] = {}
    for path in _files(package):
        if skip is not None and skip in path.parents:
            continue
        for line, module in imported_modules(path.read_text(encoding="utf-8")):
            if _within(module, forbidden):
                out.setdefault((str(path.relative_to(ROOT)), line), module)  # one entry per statement
    return [f"{file}:{line} imports {module}" for (file, line), module in sorted(out.items())]


def test_core_imports_stages_only_in_workflows() -> None:
    violations = _violations("prune_export", STAGES, skip=ROOT / "prune_export" / "workflows")
    assert not violations, "only prune_export/workflows/ may import a stage:\n" + "\n".join(violations)


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_one_way(stage: str) -> None:
    violations = _violations(stage, FORBIDDEN[stage])
    assert not violations, f"{stage} imports against calib -> exporter -> graph_passes -> engines:\n" + "\n".join(
        violations
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_the_cli_or_workflows(stage: str) -> None:
    violations = _violations(stage, CORE_TOP)
    assert not violations, f"{stage} imports the CLI or a workflow (they call stages, not the reverse):\n" + "\n".join(
        violations
    )


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
    assert {_top(m) for m in modules} == {"os", "typing", "importlib", *STAGES}  # relative imports stay inside
    assert {"graph_passes.census", "engines.prefill", "calib.data", "exporter"} <= modules
    assert any(_within(m, CORE_TOP) for _, m in imported_modules("from prune_export import cli"))
    assert not _within("prune_export.cli_helpers", CORE_TOP)


def test_the_rule_is_not_vacuous() -> None:
    """The scan covers the CLI, and the workflows (skipped by the core rule) really are where stages are wired."""
    assert ROOT / "prune_export" / "cli.py" in _files("prune_export")
    assert _violations("prune_export/workflows", STAGES)
