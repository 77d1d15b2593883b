"""Data flows one way through raytuner: no module imports a package that sits above it.

The order, lowest first, is the list below (README, "Packages and the order they import in").
A module may import its own package or module and anything listed before it; an import of
anything listed after it, at module level or inside a function, is a violation. A lazy import
inside a function still ties the lower package to the higher one, so it counts the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raytuner"

LAYERS = (
    "raytuner.errors",  # the one error type; imports nothing of raytuner
    "raytuner.filenames",  # the names of the files a run writes; imports nothing
    "raytuner.upstream",  # workarounds for upstream behaviour, in one place
    "raytuner.logs",  # logging set up where a process starts, never on import
    "raytuner.flow",  # flow-matching math: plain tensor functions
    "raytuner.precision",  # the autocast training, evaluation and validation share
    "raytuner.ray_runtime",  # connecting to (or starting) Ray
    "raytuner.placement",  # GPUs and actors from what the cluster has
    "raytuner.models",  # the families: what each model is and knows
    "raytuner.config",  # SimpleTuner files read into typed config, names checked against the families
    "raytuner.storage",  # local folders and object storage
    "raytuner.adapters",  # the LoKr adapter: build, save, load
    "raytuner.webhooks",  # SimpleTuner's webhooks
    "raytuner.quantize",  # the quantised base: a transform of the base model
    "raytuner.data",  # the image datasets: discovery, captions, aspect buckets
    "raytuner.cache",  # the cache build (Ray Data) and its on-disk format
    "raytuner.batches",  # the caches read back, and each epoch's plan of global batches
    "raytuner.evaluate",  # eval loss, validation images, CLIP score, metrics
    "raytuner.outputs",  # what a run writes: names, config copies, model card, curves
    "raytuner.hub",  # Hugging Face Hub uploads
    "raytuner.train",  # the pre-flight check, the launcher and the per-worker loop
    "raytuner.tune",  # sweeps
    "raytuner.generate",  # images from trained adapters
    "raytuner.demo",  # the tiny end-to-end run
    "raytuner.cli",  # the `raytuner` command
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The index of the layer that holds ``module``; None for the package root."""
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    return None


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """Every raytuner module a file imports, anywhere in it, with the line of the import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("raytuner")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raytuner"):
            assert node.level == 0, "raytuner imports by absolute name"
            if node.module == "raytuner":  # `from raytuner import flow`: the modules are the names
                found += [(node.lineno, f"raytuner.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def upward_imports() -> tuple[list[str], list[str]]:
    """The imports that go up the order, and the modules no layer holds."""
    upward, unplaced = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "raytuner":
            continue
        own = layer_of(module)
        if own is None:
            unplaced.append(module)
            continue
        for line, imported in _imported(ast.parse(path.read_text(encoding="utf-8"))):
            theirs = layer_of(imported)
            if theirs is None:
                unplaced.append(f"{imported} (imported at {module}:{line})")
            elif theirs > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {imported}")
    return upward, unplaced


def test_every_module_has_a_place_in_the_order() -> None:
    assert upward_imports()[1] == []


def test_no_module_imports_a_package_above_it() -> None:
    assert upward_imports()[0] == []


def test_the_scan_sees_function_level_imports() -> None:
    """The scan itself works: an import inside a function is found as one at the top is."""
    tree = ast.parse("def f():\n    from raytuner.cli import main\n")
    assert _imported(tree) == [(2, "raytuner.cli")]
    assert layer_of("raytuner.cli") == len(LAYERS) - 1
    assert layer_of("raytuner.cache.format") == LAYERS.index("raytuner.cache")
