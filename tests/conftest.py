"""Session-wide fixtures: the tiny checkpoints are built once per test session and shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: everything they load is built offline by raytuner itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight diffusers checkpoints of both families, built offline once per session."""
    from raytuner.models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {family: build_tiny_checkpoint(family, root / family) for family in ("cosmos2image", "omnigen")}


@pytest.fixture(scope="session")
def tiny_cosmos_dir(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["cosmos2image"]


@pytest.fixture(scope="session")
def tiny_omnigen_dir(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["omnigen"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests run only where CUDA is present (the lent accelerator); never instead of a CPU test."""
    import torch

    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_without_cuda)
