"""The package's import structure, read from the source with ``ast``: no import cycles between
nulltext modules (imports inside functions count: a late import that dodges a cycle is still one),
and no module imports another's underscore-private names."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

# Found without importing it (no torch needed to read the source).
PACKAGE_DIR = Path(importlib.util.find_spec("nulltext").origin).resolve().parent


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package at ``package_dir``."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports(package_dir: Path) -> dict[str, list[tuple[str, str | None, int]]]:
    """Module -> its imports of package modules, as (imported module, imported name or None, line).

    ``from a.b import c`` counts as importing module ``a.b.c`` when that is a module, else name
    ``c`` of module ``a.b``. Every import statement counts, at any depth (functions, ``if``).
    """
    modules = module_files(package_dir)
    package = package_dir.name
    found: dict[str, list[tuple[str, str | None, int]]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = found.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    # Relative: level 1 is this module's package (the module itself for an __init__).
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != package:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edges.append((sub, None, node.lineno) if sub in modules else (source, alias.name, node.lineno))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, nodes coloured)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def import_cycle(package_dir: Path = PACKAGE_DIR) -> list[str] | None:
    graph = {m: {target for target, _, _ in edges if target != m} for m, edges in imports(package_dir).items()}
    return find_cycle(graph)


def private_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """``importer:line imports module._name`` for every private name taken from another package module."""
    return [
        f"{module}:{line} imports {target}.{name}"
        for module, edges in sorted(imports(package_dir).items())
        for target, name, line in edges
        if name is not None and name.startswith("_") and target != module
    ]


def test_the_graph_sees_the_package():
    found = imports(PACKAGE_DIR)
    assert {"nulltext", "nulltext.cli", "nulltext.editing.edit", "nulltext.methods"} <= set(found)
    # An import inside a function is an edge too (the runner is imported lazily by the CLI).
    assert "nulltext.runner" in {target for target, _, _ in found["nulltext.cli"]}


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_cycles():
    cycle = import_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    found = private_imports()
    assert not found, "private names imported from other modules:\n" + "\n".join(found)
