"""Session-wide fixtures: the tiny checkpoints are built once per test session and shared."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from raytuner.ray_runtime import free_port
from tests.ray_cluster import RayCluster
from tests.s3_server import S3Server

if TYPE_CHECKING:
    from tests.training_data import Data

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


@pytest.fixture(scope="session")
def cosmos_data(tmp_path_factory: pytest.TempPathFactory, tiny_cosmos_dir: Path) -> Data:
    """8 training and 2 held-out tiny Cosmos2 images (no masks) with their cache folders, shared by
    every module that trains on them.

    The first run on them builds their cache (text, latents, held-out latents); later runs, in any
    module, find it built and encode nothing, as a user's next run on the same data does. Building
    it once instead of once per module saves a Ray Data build (a text and a VAE actor) each time.
    """
    # Imported here: the helper loads raytuner's config and model code, which the session's
    # collection (and the tests that use no model) need not wait for.
    from tests.training_data import cosmos_training_data

    return cosmos_training_data(tmp_path_factory.mktemp("cosmos-data"), tiny_cosmos_dir)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server bound to 127.0.0.1; its address and keys are exported as AWS_* variables
    before Ray starts, so Ray workers on every node reach it through the default credential chain."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    saved = {name: os.environ.get(name) for name in _AWS_VARIABLES}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": info.endpoint_url,
            "AWS_ACCESS_KEY_ID": info.access_key_id,
            "AWS_SECRET_ACCESS_KEY": info.secret_access_key,
            "AWS_DEFAULT_REGION": info.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    try:
        yield info
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


TRAIN_HEALTH_CHECK_INTERVAL_S = 0.5


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[RayCluster]:
    """One Ray for every Ray test: a real 2-node cluster (``ray.cluster_utils.Cluster``) on this machine.

    Each node declares more logical CPUs than the machine has cores (see raytuner.ray_runtime);
    the temp dir is the session's own, and the cluster is shut down at the end.
    """
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tmp_path_factory.mktemp("ray")
    # Cluster() records its address in the machine's default Ray folder whatever temp_dir says,
    # and fails where that folder does not exist yet (a fresh machine).
    (Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)
    dashboard_port = free_port()
    # The cluster's processes inherit these from this one (and the test process reads the first).
    settings = {
        # Ray Train's placement-group cleaner finds the State API through this variable, not through
        # the last Ray started on the machine (the demo and job-submit tests start others).
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        # Ray Train's controller looks at its workers every 2 s by default, so a run that has ended
        # is seen ~1 s later on average; the suite's runs take seconds, and there are dozens.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(TRAIN_HEALTH_CHECK_INTERVAL_S),
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    cluster = Cluster(
        initialize_head=True,
        # The dashboard (on loopback) serves the State API that Ray Train's clean-up of finished runs
        # queries; without it each run's worker reservations outlive the run.
        head_node_args={
            "num_cpus": 4,
            "temp_dir": str(temp_dir),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        },
    )
    cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield RayCluster(address=cluster.address, nodes=len(ray.nodes()))
    finally:
        ray.shutdown()
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


# Fixtures that start a Ray or connect to one: a test that uses any of them is a `ray` test.
RAY_FIXTURES = frozenset({"ray_cluster", "ray_head", "fake_cluster"})


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that uses a Ray fixture (directly or through another fixture) ``ray``.

    ``gpu``-marked tests run only where CUDA is present (the lent accelerator); never instead of a
    CPU test. The compatibility-table check is moved to the end, after the tests it names.
    """
    import torch

    for item in items:
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: getattr(item, "originalname", item.name) == RUNS_LAST)
    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_without_cuda)
