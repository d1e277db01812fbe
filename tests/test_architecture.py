"""The package's module graph: no import cycles, and no import inside a function to dodge one.

Every ``hf_tdrop`` module is parsed (``ast``, nothing is imported): each ``from .x import y``,
``from hf_tdrop.x import y`` and ``import hf_tdrop.x`` statement, at the top of the module or inside
a function, is an edge to the module it loads (and to the packages above it, whose ``__init__``
runs first). Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hf_tdrop"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAZY_IMPORTS = {
    # The command line: ``hf-tdrop --help`` and argument checking must not load torch or
    # transformers, so every package module is imported inside the command that needs it.
    ("hf_tdrop.cli", "*"),
}
"""``(importer, imported)`` pairs allowed inside a function: genuinely lazy imports, not cycles."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_function: bool = False):
    """``(node, in_function)`` for every import statement, skipping ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), in_function)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(node, inner)


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules}


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package modules an import statement loads."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                found |= _with_parents(alias.name, modules)
        return found
    if node.level:
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        base = node.module
    else:
        return found
    found |= _with_parents(base, modules)
    for alias in node.names:  # ``from . import masking``: the submodule itself
        if f"{base}.{alias.name}" in modules:
            found |= _with_parents(f"{base}.{alias.name}", modules)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """``({module: modules it imports}, [(importer, imported, line) of function-level imports])``."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    lazy: list[tuple[str, str, int]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _imports(tree):
            # the importer's own packages are already initialising when it runs: no edge to them
            for target in _targets(name, path, node, modules) - _with_parents(name, modules):
                graph[name].add(target)
                if in_function:
                    lazy.append((name, target, node.lineno))
    return graph, lazy


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _allowed(importer: str, imported: str) -> bool:
    return (importer, imported) in LAZY_IMPORTS or (importer, "*") in LAZY_IMPORTS


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 20 and "hf_tdrop.methods.targeted_dropout" in graph["hf_tdrop.patching"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_package_import_outside_the_allowlist():
    _, lazy = import_graph()
    offending = [f"{importer} (line {line}) imports {imported}" for importer, imported, line in lazy
                 if not _allowed(importer, imported)]
    assert not offending, "imports inside functions: " + "; ".join(offending)


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path, monkeypatch):
    """The checks above can fail: a two-module cycle through a function-level import is found."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n"
                                          "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import x\n")
    (package / "c.py").write_text("import hf_tdrop.a\n")
    monkeypatch.setitem(globals(), "ROOT", package)
    graph, lazy = import_graph()
    assert graph["hf_tdrop.a"] == {"hf_tdrop.sub", "hf_tdrop.sub.b"}
    assert "hf_tdrop.c" not in graph["hf_tdrop.sub.b"]  # TYPE_CHECKING only
    assert graph["hf_tdrop.c"] == {"hf_tdrop.a"}
    assert sorted((i, t) for i, t, _ in lazy) == [("hf_tdrop.sub.b", "hf_tdrop.a")]
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"hf_tdrop.a", "hf_tdrop.sub.b"}


@pytest.mark.parametrize("module", ["hf_tdrop.constants", "hf_tdrop.config", "hf_tdrop._utils"])
def test_the_bottom_modules_import_no_torch(module):
    """Constants, config validation and the small helpers stay importable without torch (the
    command line checks its arguments with them before loading torch)."""
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = [n for n, in_function in _imports(tree) if not in_function]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names] + \
        [n.module or "" for n in top if isinstance(n, ast.ImportFrom) and not n.level]
    assert not [n for n in names if n.split(".")[0] in ("torch", "transformers")], names
