"""No import circles: every import of the installed package (``engine.*``, with
``shm/``, ``workers/`` and ``tools/`` under it as pyproject places them), those inside
functions too, read with ``ast``: a lazy import hides a circle from Python, not from a
reader."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"engine": "engine", "shm": "engine.shm", "workers": "engine.workers",
           "tools": "engine.tools"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _known(name: str, modules) -> str | None:
    """The module of the tree an import names: the longest known prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node, here: str, is_package: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [_known(a.name, modules) for a in node.names]
    base = node.module or ""
    if node.level:
        parent = here if is_package else here.rpartition(".")[0]
        for _ in range(node.level - 1):
            parent = parent.rpartition(".")[0]
        base = f"{parent}.{base}".rstrip(".")
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known(base, modules)
            for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= set(_targets(node, name, path.name == "__init__.py", modules))
        graph[name] = edges - {None, name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` (its modules, the first repeated at the end), or []."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (circle := visit(start)):
            return circle
    return []


def test_the_walk_reads_the_tree():
    graph = import_graph()
    assert "engine.api" in graph["engine.cluster.actor"]
    assert "engine.shm.block" in graph["engine.api"]          # a function's own import
    assert "engine.workers.base" in graph["engine.cluster.server"]


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    circle = find_circle(graph)
    assert not circle, "import circle: " + " -> ".join(circle)
