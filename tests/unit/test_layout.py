"""The package's shape: small functions, small modules, no reaching into another module's
private names, in every subpackage. Fails with the offenders listed, so a refactor knows what to
split."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "alfk_cli"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _modules() -> list[tuple[Path, ast.Module, int]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        out.append((path.relative_to(PACKAGE), ast.parse(text), len(text.splitlines())))
    return out


def test_every_module_is_seen():
    """rglob, not glob: modules in subpackages are checked too."""
    seen = {str(p) for p, _, _ in _modules()}
    assert "errors.py" in seen
    assert seen == {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}


def test_no_long_functions():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree, _ in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_no_long_modules():
    long = [f"{p} ({n} lines)" for p, _, n in _modules() if n > MAX_MODULE_LINES]
    assert not long, "modules over 450 lines: " + "; ".join(long)


def test_no_private_imports_across_modules():
    leaks = [
        f"{path}: from {node.module} import {alias.name}"
        for path, tree, _ in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alfk_cli")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not leaks, "private names imported across modules: " + "; ".join(leaks)
