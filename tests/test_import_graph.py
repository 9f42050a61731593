"""No import cycles between the files of the inference, serving, evaluation and model-loading packages.

Every `import` counts, also the ones inside functions: a function-local import hides a cycle from Python's
import machinery but not from a reader, who still has to hold both files in mind at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "loraforge"
CHECKED = ("loraforge.models", "loraforge.inference", "loraforge.evaluate", "loraforge.serve", "loraforge.metrics")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The loraforge modules `path` imports anywhere in the file (`from pkg import sub` counts as `pkg.sub`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found.update(subs & known)
            if node.module in known:
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    return {name: _imports(path, known) - {name} for name, path in files.items()
            if name.startswith(CHECKED)}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest path start → … → start inside the checked modules, or None."""
    frontier, seen = [[start]], {start}
    while frontier:
        path = frontier.pop(0)
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return path + [start]
            if nxt in graph and nxt not in seen:
                seen.add(nxt)
                frontier.append(path + [nxt])
    return None


def test_the_checked_packages_have_modules():
    graph = _graph()
    assert {"loraforge.models.discovery", "loraforge.models.loader", "loraforge.serve.app"} <= set(graph)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_no_import_cycle(module):
    graph = _graph()
    # A package's __init__ imports its submodules to re-export them, so a submodule imports the sibling it needs
    # directly, never `from loraforge.<its own package> import ...`: that closes a cycle and fails here.
    cycle = _cycle_through(graph, module)
    assert cycle is None, " → ".join(cycle)
