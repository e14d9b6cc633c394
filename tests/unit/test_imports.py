"""The package's import graph: no circle between modules nor between subpackages, each
subpackage imports only from the floors below its own, and the house has rooms.

Every import counts, at module level or inside a function (an import moved into a function to
dodge a circle is still the circle), ``if TYPE_CHECKING:`` ones included. Fails with the
offending imports listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "alfk_cli"
NAME = PACKAGE.name

#: Each subpackage's floor: it may import from subpackages on lower floors (and from itself),
#: never from its own floor or above. The same floors are in each ``__init__.py`` docstring and
#: in docs/design.md ("Module map").
FLOORS = {
    "util": 1,
    "data": 2,
    "store": 2,
    "search": 2,
    "models": 3,
    "features": 4,
    "train": 4,
    "strategies": 5,
    "embed": 5,
    "selection": 6,
    "simulate": 6,
    "labels": 7,
    "cli": 8,
}
#: Top-level modules and their floors: ``errors`` under everything, the package's own
#: ``__init__`` (``__version__``) just above it, ``__main__`` (``python -m alfk_cli``) on top.
TOP_LEVEL = {"errors": 0, "__init__": 0.5, "__main__": 9}
MAX_TOP_LEVEL_MODULES = 6
MIN_SUBPACKAGES = 6
#: Until the move into subpackages (issue 20) the package is flat: no rooms yet, no floors.
FLAT_LAYOUT_ALLOWED = False


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, packages under their own name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import sub` imports the submodule; `from mod import name`, the module
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    """The subpackage a module lives in, or its own name for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _subpackages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def _top_level_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_subpackages():
    rooms: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        rooms.setdefault(_room(module), set()).update(
            _room(t) for t in targets if _room(t) != _room(module)
        )
    cycles = _cycles(rooms)
    assert not cycles, "circles between subpackages: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_house_has_rooms():
    """At most six top-level modules and at least six subpackages, each one with a floor."""
    subs, top = _subpackages(), _top_level_modules()
    if FLAT_LAYOUT_ALLOWED and not subs:
        return
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"top-level modules: {', '.join(top)}"
    assert len(subs) >= MIN_SUBPACKAGES, f"subpackages: {', '.join(subs)}"
    assert set(top) <= set(TOP_LEVEL), (
        f"top-level modules without a floor: {set(top) - set(TOP_LEVEL)}"
    )
    assert set(subs) <= set(FLOORS), f"subpackages without a floor: {set(subs) - set(FLOORS)}"


def test_imports_go_down_the_floors():
    """A subpackage imports from lower floors only (and from itself)."""
    floors = {**FLOORS, **TOP_LEVEL}
    if not _subpackages():  # the flat layout: every module is its own room, no floors yet
        assert FLAT_LAYOUT_ALLOWED
        return
    up = []
    for module, targets in sorted(_graph().items()):
        mine = _room(module)
        for t in sorted(targets):
            theirs = _room(t)
            if theirs != mine and floors.get(theirs, 99) >= floors.get(mine, -1):
                up.append(
                    f"{module} ({mine}, floor {floors.get(mine)}) imports {t} "
                    f"({theirs}, floor {floors.get(theirs)})"
                )
    assert not up, "imports that do not go down: " + "; ".join(up)
