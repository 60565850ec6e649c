"""
The package's layout: no import circle at any depth, dependencies that point
inward (docs/architecture.rst), and folders a reader can take in at a glance.

Imports are read from the source, the ones inside functions included; only
those under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: What each package may import of ours besides itself (and the empty
#: ``kapow`` package): the layers of docs/architecture.rst.
ALLOWED = {
    "core": set(),
    "commands": {"core"},
    "web": {"core"},
    "handlers": {"core", "web"},
    "streams": {"core", "web", "handlers"},
    "user": {"core", "web", "handlers", "streams"},
    "data": {"core", "web", "handlers"},
    "control": {"core", "web", "handlers"},
    "client": {"core", "commands"},
    "history": {"core"},
}

#: Packages that must load without these libraries (``kapow get/set`` and
#: the route command line start in them; the rules stay free of Twisted).
LEAN = {
    "core": ("twisted", "klein", "treq", "zope"),
    "commands": ("twisted", "klein", "treq", "zope", "cryptography"),
}

#: Programs rather than parts: they start the whole command line (the
#: forkserver runs it in forked children), so they may import any layer.
ENTRY_POINTS = {"kapow.__main__", "kapow.cli", "kapow.commands.forkserver"}

MAX_MODULES_PER_FOLDER = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / "kapow").rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imported_names(path: Path) -> Iterable[tuple[str, bool]]:
    """(dotted name, at module level) of every import that can run."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", id(node) in top
            yield node.module, id(node) in top


def import_graph(known: Mapping[str, Path]) -> dict[str, set[str]]:
    """Each module of ours to the modules of ours that importing it runs
    (a module's packages included: importing ``a.b.c`` runs ``a`` and ``a.b``)."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported, _ in imported_names(path):
            parts = imported.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in known and prefix != name:
                    targets.add(prefix)
        graph[name] = targets
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` with more than one member
    (Tarjan's algorithm), each in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    """The package a module belongs to for the layer rules (``kapow.core.routes`` → ``core``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_imports_inside_functions_but_not_type_checking_ones(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import kapow.core\n"
        "if TYPE_CHECKING:\n    import kapow.server\n"
        "def f():\n    from kapow.user import api\n"
    )
    names = set(imported_names(source))
    assert ("kapow.core", True) in names
    assert ("kapow.user.api", False) in names
    assert not any(name.startswith("kapow.server") for name, _ in names)


def test_no_import_circle() -> None:
    graph = import_graph(modules())
    assert graph.get("kapow.cli"), "the reader found no import at all"
    assert cycles(graph) == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_inward(package: str) -> None:
    known = modules()
    graph = import_graph(known)
    members = [name for name in graph if package_of(name) == package and name not in ENTRY_POINTS]
    assert members, f"no module in kapow.{package}"
    wrong = sorted(
        f"{name} imports {target}"
        for name in members
        for target in graph[name]
        if package_of(target) not in {package, "", *ALLOWED[package]}
    )
    assert wrong == []


def test_nothing_imports_the_assembly_but_the_server_command() -> None:
    graph = import_graph(modules())
    importers = sorted(name for name, targets in graph.items() if "kapow.server.assembly" in targets)
    assert importers == ["kapow.server.main"]


@pytest.mark.parametrize("package", sorted(LEAN))
def test_lean_packages_import_no_heavy_library(package: str) -> None:
    wrong = sorted(
        f"{name} imports {imported}" + ("" if top else " (in a function)")
        for name, path in modules().items()
        if package_of(name) == package
        for imported, top in imported_names(path)
        if imported.split(".")[0] in LEAN[package] and (top or imported.split(".")[0] != "cryptography")
    )
    assert wrong == []


def test_no_folder_holds_more_than_twelve_modules() -> None:
    folders: dict[Path, int] = {}
    for path in (SRC / "kapow").rglob("*.py"):
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
    crowded = {
        str(folder.relative_to(SRC)): count
        for folder, count in folders.items()
        if count > MAX_MODULES_PER_FOLDER
    }
    assert len(folders) > 5
    assert crowded == {}
