"""A family owns its knowledge: no code outside ``raytuner/models/`` asks which family it has.

What differs between families (their licence, their sigma schedule, their safety policy, how
their pipeline renders) is a class attribute or method of the family in its own file; the rest of
raytuner asks the family, never compares its name.
"""

from __future__ import annotations

import ast
from pathlib import Path

from raytuner.models.registry import family_aliases, known_families

PACKAGE = Path(__file__).resolve().parents[2] / "raytuner"
FAMILIES_FOLDER = PACKAGE / "models"


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (a module's, a class's or a function's)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def family_names_outside_the_families() -> list[str]:
    names = set(known_families()) | set(family_aliases())
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(FAMILIES_FOLDER):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.strip().lower() in names
                and id(node) not in docstrings
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_no_code_outside_the_models_package_names_a_family() -> None:
    assert family_names_outside_the_families() == []


def test_the_scan_sees_a_family_name() -> None:
    """The scan itself works: it finds the registry's names where they are (in the families)."""
    source = (FAMILIES_FOLDER / "omnigen.py").read_text(encoding="utf-8")
    assert any(
        isinstance(node, ast.Constant) and node.value == "omnigen" for node in ast.walk(ast.parse(source))
    )
