"""The layout of codegen/ and harness/: no import cycle between their modules at module level, and
no module longer than MAX_LINES lines.

An import counts when it runs as the module is imported: anywhere but inside a function body
(class bodies and `if`/`try` blocks at the top run, and so do `if TYPE_CHECKING:` blocks as far as
a type checker is concerned). `from P import x` is an import of the module P.x when that is a
module, else of P; `import P.Q` an import of P.Q. Only imports between the walked packages count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("codegen", "harness")
MAX_LINES = 500


def module_sources(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> file, for every `*.py` file under the `packages` folders of `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _module_level_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        else:
            yield from _module_level_imports(node)


def _imported(
    name: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: Mapping[str, Path]
) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        package = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.add(submodule)
        elif base in modules:
            found.add(base)
    return found


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports at module level."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        for node in _module_level_imports(tree):
            graph[name] |= _imported(name, is_package, node, modules)
        graph[name].discard(name)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that ends where it starts) per strongly connected component of more
    than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return [_path_through(component, graph) for component in components]


def _path_through(component: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A cycle inside `component`, from its first module back to it (breadth-first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(component)}")


# The checker itself, on made-up packages: (files, expected cycles).
CHECKER_CASES = [
    pytest.param(
        {"p/__init__.py": "", "p/a.py": "from . import b\n", "p/b.py": "from .a import f\n"},
        [["p.a", "p.b", "p.a"]],
        id="relative-imports-both-ways",
    ),
    pytest.param(
        {
            "p/__init__.py": "",
            "p/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import T\n",
            "p/b.py": "import p.a\n",
        },
        [["p.a", "p.b", "p.a"]],
        id="type-checking-block-counts",
    ),
    pytest.param(
        {
            "p/__init__.py": "",
            "p/a.py": "from .b import f\n",
            "p/b.py": "def f():\n    from .a import g\n",
        },
        [],
        id="function-level-import-does-not-count",
    ),
    pytest.param(
        {
            "p/__init__.py": "from .a import f\n",
            "p/a.py": "from .c import g\n",
            "p/c.py": "from p import a\n",
        },
        [["p.a", "p.c", "p.a"]],
        id="from-package-import-submodule",
    ),
    pytest.param(
        {
            "p/__init__.py": "",
            "p/q/__init__.py": "from ..a import f\n",
            "p/a.py": "class A:\n    from p.q import x\n",
        },
        [["p.a", "p.q", "p.a"]],
        id="class-body-and-parent-relative-import",
    ),
]


@pytest.mark.parametrize(("files", "expected"), CHECKER_CASES)
def test_the_checker_finds_cycles(tmp_path: Path, files: dict[str, str], expected: list) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cycles(import_graph(module_sources(tmp_path, ("p",)))) == expected


def test_no_import_cycle_at_module_level() -> None:
    graph = import_graph(module_sources(ROOT, PACKAGES))
    assert "harness.environment" in graph["harness.cli"]  # the walk sees the project's imports
    found = cycles(graph)
    assert not found, "import cycles at module level:\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


def test_no_module_is_too_long() -> None:
    lengths = {
        path.relative_to(ROOT): len(path.read_text().splitlines())
        for path in module_sources(ROOT, PACKAGES).values()
    }
    too_long = {str(path): count for path, count in lengths.items() if count > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
