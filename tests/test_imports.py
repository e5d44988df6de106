"""The package's import graph has no cycles, counting imports inside functions.

A cycle hidden in a function-level import still ties two modules together (neither can be
understood, tested or moved without the other), so every ``import`` statement anywhere in a
module's AST is an edge: ``import a.b``, ``from a.b import c`` (an edge to ``a.b``, and to
``a.b.c`` where that is a module), and relative imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adapterctl"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            named = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            out.update(named)
            if not named or len(named) < len(node.names):  # a name from the module itself
                out.add(target)
    return {m for m in out if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its source."""
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a → b → … → a) in ``g``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    g = graph()
    assert "adapterctl.merge.plan" in g["adapterctl.merge.numpy_engine"]  # the walk sees edges
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("g", "cyclic"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),  # a diamond is no cycle
    ],
)
def test_the_cycle_finder(g: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(g) is not None) == cyclic


def test_function_level_imports_count(tmp_path: Path) -> None:
    src = "def f():\n    from adapterctl.registry import Registry\n    from . import refs\n"
    (tmp_path / "x.py").write_text(src)
    modules = {"adapterctl.registry": PACKAGE, "adapterctl.refs": PACKAGE}
    assert _edges("adapterctl.x", tmp_path / "x.py", modules) == modules.keys()
