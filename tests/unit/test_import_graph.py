"""The project's packages import each other in one direction only.

An import cycle works until someone moves a line (Python resolves it by import order and a
late `from .x import y` inside a function), so it is caught here, from the source: every
`import`/`from ... import` in a module (inside functions too; only `if TYPE_CHECKING:`
blocks are left out, since they never run) is an edge between the package's modules, and
any cycle fails the test with its modules named in order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "emailqueue_operator": REPO / "operator" / "emailqueue_operator",
    "email_worker": REPO / "worker" / "email_worker",
    "emailqueue_testbed": REPO / "testbed" / "emailqueue_testbed",
}


def module_files(package: str, root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them but those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules among `known` that `module` (at `path`) imports."""
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name` imports pkg, and pkg.name too when that is a module.
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in candidates:
            # `import a.b.c` runs a, a.b and a.b.c; the deepest known one is the edge that matters.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    files: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        files.update(module_files(package, root))
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan),
    each listed as a path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        start = min(component)
        # Shortest way back to `start` inside the component (BFS), so the message is short.
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for succ in sorted(graph[node] & component):
                    if succ not in previous:
                        previous[succ] = node
                        following.append(succ)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append([path[0], *reversed(path[1:-1]), start])
    return cycles


# Cycles known and not yet broken, each with what breaks it. The test fails on any other
# cycle, and on an entry here that no longer is one (so the list only shrinks).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(c) for c in new)
    gone = set(KNOWN_CYCLES) - {frozenset(c) for c in cycles}
    assert not gone, f"no longer a cycle, remove from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_the_worker_does_not_import_the_operator_or_the_testbed() -> None:
    """The worker ships as its own distribution: it must run without the operator installed."""
    graph = import_graph()
    leaks = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("email_worker")
                   for t in targets if not t.startswith("email_worker"))
    assert not leaks, leaks


@pytest.mark.parametrize("graph, expected", [
    # a two-module circle, as sim and baselines had (the lazy import counts)
    ({"p.a": {"p.b"}, "p.b": {"p.a"}}, [["p.a", "p.b", "p.a"]]),
    # a longer one, found with the module outside it left out
    ({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}, [["p.a", "p.b", "p.c", "p.a"]]),
    # a diamond is not a cycle
    ({"p.a": {"p.b", "p.c"}, "p.b": {"p.d"}, "p.c": {"p.d"}, "p.d": set()}, []),
])
def test_find_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert find_cycles(graph) == expected


def test_lazy_and_relative_imports_are_edges(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                                  "from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    files = module_files("pkg", package)
    graph = {m: imports_of(m, p, set(files)) for m, p in files.items()}
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg", "pkg.c"}  # the TYPE_CHECKING import of a is no edge
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
