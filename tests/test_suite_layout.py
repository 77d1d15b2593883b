"""The test suite's own shape: shared code lives in helper modules, never in a test module or a conftest.

A test module imported by another is collected twice over (its tests run from one place, its
fixtures may be set up from another), and a conftest imported as a module is a second copy of the
one pytest loaded. Helpers are modules whose names do not start with ``test_``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names, relative imports
    resolved against ``package`` (the dotted name of the file's folder)."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            # ``from tests import test_x`` imports a module by an imported name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden(module: str) -> bool:
    if module != "tests" and not module.startswith("tests."):
        return False
    last = module.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def test_no_test_file_imports_a_test_module_or_a_conftest() -> None:
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        name = str(path.relative_to(REPO_ROOT))
        package = ".".join(path.relative_to(REPO_ROOT).parent.parts)
        modules = imported_modules(path.read_text(encoding="utf-8"), package)
        bad = sorted(module for module in modules if forbidden(module))
        if bad:
            offenders[name] = bad
    assert not offenders, f"move what these share into a helper module: {offenders}"


def test_the_scan_sees_each_form_of_import() -> None:
    """The scan must catch absolute, dotted and relative imports, so that passing means something."""
    sources = {
        "from tests.train.test_step import SCHEDULE": {"tests.train.test_step"},
        "import tests.config.conftest": {"tests.config.conftest"},
        "from .test_offload import training": {"tests.train.test_offload"},
        "from . import test_step": {"tests.train.test_step"},
        "from ..conftest import S3Server": {"tests.conftest"},
        "from tests.cache.helpers import draw_images": set(),
        "from tests import ray_head": set(),
        "from tests import test_adapters": {"tests.test_adapters"},
    }
    for source, expected in sources.items():
        modules = imported_modules(source, "tests.train")
        assert {module for module in modules if forbidden(module)} == expected, source
