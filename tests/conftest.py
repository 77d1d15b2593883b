"""Session-wide fixtures: the tiny checkpoints are built once per test session and shared."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


# Runs after every other test: it checks that the tests named by the compatibility table passed.
RUNS_LAST = "test_every_honoured_key_names_a_test_that_passed"


@dataclass(eq=False)  # registered as a pluggy plugin, which must be hashable
class RunRecord:
    """What this session collected and how each test ended, for the compatibility-table check."""

    items: dict[str, pytest.Item] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # After -k / --deselect: exactly the tests this session will run.
        self.items = {item.nodeid: item for item in session.items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A test passed when its call passed and neither setup nor teardown skipped or failed it.
        if report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, "passed")


TEST_RUN_RECORD = pytest.StashKey[RunRecord]()


def pytest_configure(config: pytest.Config) -> None:
    record = RunRecord()
    config.stash[TEST_RUN_RECORD] = record
    config.pluginmanager.register(record, "raytuner-test-run-record")


@pytest.fixture
def run_record(request: pytest.FixtureRequest) -> RunRecord:
    return request.config.stash[TEST_RUN_RECORD]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests run only where CUDA is present (the lent accelerator); never instead of a CPU test.

    The compatibility-table check is moved to the end, after the tests it names.
    """
    import torch

    items.sort(key=lambda item: getattr(item, "originalname", item.name) == RUNS_LAST)
    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_without_cuda)
