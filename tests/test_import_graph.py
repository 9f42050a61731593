"""No import cycles between the files of loraforge (every package); the training path is made of small functions.

Every `import` counts, also the ones inside functions: a function-local import hides a cycle from Python's
import machinery but not from a reader, who still has to hold both files in mind at once.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "loraforge"
CHECKED = ("loraforge",)  # the whole package


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


@functools.lru_cache(maxsize=1)  # parsed once for all the parametrized cases
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
    assert {"loraforge.models.discovery", "loraforge.models.loader", "loraforge.serve.app", "loraforge.data.dataset",
            "loraforge.data.tasks", "loraforge.train.loop", "loraforge.image.train", "loraforge.cli"} <= set(graph)
    # the graph sees function-local imports too
    assert "loraforge.train.setup" in graph["loraforge.train.loop"]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through(graph, "a") == ["a", "b", "c", "a"] and _cycle_through(graph, "d") is None


@pytest.mark.parametrize("module", sorted(_graph()))
def test_no_import_cycle(module):
    graph = _graph()
    # A package's __init__ imports its submodules to re-export them, so a submodule imports the sibling it needs
    # directly, never `from loraforge.<its own package> import ...`: that closes a cycle and fails here.
    cycle = _cycle_through(graph, module)
    assert cycle is None, " → ".join(cycle)


# The training path: both recipes' loops and their setup steps. The loop functions stay readable top to bottom.
TRAINING_PATH = sorted((ROOT / "train").glob("*.py")) + [ROOT / "image" / "train.py"]
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("path", TRAINING_PATH, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_long_function_in_the_training_path(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split into named steps: {long}"
