"""The layering rule, written down once: which folder may import which, and no import circle.

Every import counts, at module level, inside functions and under `TYPE_CHECKING` (a circle in
types is still a circle). A group may import its own modules and any group of a lower rank;
groups of the same rank (engine and speech, kernels and data) never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emoq_serve", "training", "export", "benchmarks")

#: Lowest first. `core` is emoq_serve's top-level modules (config, audio, bundle, metrics, ...).
RANKS: dict[str, int] = {
    "core": 0,
    "emoq_serve.kernels": 1, "emoq_serve.data": 1,
    "emoq_serve.model": 2,
    "emoq_serve.executors": 3,
    "emoq_serve.engine": 4, "emoq_serve.speech": 4, "emoq_serve.client": 4,
    "emoq_serve.server": 5,
    "emoq_serve.cli": 6,
    "training": 7, "export": 8, "benchmarks": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "emoq_serve":
        return parts[0]
    if len(parts) > 1 and (f"emoq_serve.{parts[1]}" in RANKS):
        return f"emoq_serve.{parts[1]}"
    return "core"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (every import statement, wherever it stands)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one.
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                               for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = group(src), group(dst)
            if a != b and RANKS[b] >= RANKS[a]:
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    return sorted(bad)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            # A package's __init__ importing its own submodules is how packages expose them, not a circle.
            if v == w.rsplit(".", 1)[0]:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_group_has_a_rank():
    assert {group(m) for m in import_graph()} <= set(RANKS)


def test_no_lower_layer_imports_a_higher_one():
    assert layer_violations(import_graph()) == []


def test_no_import_circle():
    assert import_cycles(import_graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The two checks on a graph with one bad edge each (so a check that can never fail shows here)."""
    graph = import_graph()
    graph["emoq_serve.server.scoring"].add("emoq_serve.server.service")  # service already imports scoring
    graph["emoq_serve.executors.pipeline"].add("emoq_serve.engine.batcher")
    assert any({"emoq_serve.server.scoring", "emoq_serve.server.service"} <= set(c) for c in import_cycles(graph))
    assert layer_violations(graph) == ["emoq_serve.executors.pipeline (emoq_serve.executors) imports "
                                       "emoq_serve.engine.batcher (emoq_serve.engine)"]
