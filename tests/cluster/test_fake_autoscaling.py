"""Autoscaling, end to end, on a fake multi-node cluster started from cluster/local-fake.yaml.

Ray's fake multi-node provider turns "launch a node" into "start another raylet on this machine",
so the real autoscaler makes real decisions here: a job whose workers need ``fake_gpu``, which only
the worker node type has, makes it add worker nodes; once the job is over and the nodes are idle it
removes them.

The test owns one head node, started with ``ray start --head --block`` in a session of its own, with
its own temp dir, free ports, the dashboard on loopback and token authentication on, from an
environment without the caller's RAY_* variables. Stopping it is a SIGTERM to that process; the
worker nodes the autoscaler started are found by the head's temp dir in their command lines and
stopped by PID if any outlive it. ``ray stop`` is never used: it stops every Ray on the machine.

Ray 2.60's autoscaler v2 runs its config through Ray's ``prepare_config``, which opens the fake
provider's example.yaml, and the wheel does not ship that file: the head runs autoscaler v1, which
reads local-fake.yaml as written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from raytuner.ray_runtime import free_port
from tests.cluster.schemas import CLUSTER_DIR, load_yaml_documents

RAY = str(Path(sys.executable).with_name("ray"))
JOB = Path(__file__).with_name("scale_out_job.py")
WORKERS = 2
# Ray's Unix socket paths live under the temp dir and must fit in sun_path (108 bytes).
MAX_TEMP_DIR_LENGTH = 40
HEAD_START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 180
SCALE_DOWN_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
LEFTOVER_GRACE_S = 20


def _clean_environment() -> dict[str, str]:
    """This process's environment without any Ray setting (the session cluster's address included)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}


def _processes_of(session_id: int, marker: str) -> list[psutil.Process]:
    """Processes in the head's session, or whose command line names a path in its temp dir (the fake nodes)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            in_session = os.getsid(process.pid) == session_id
        except OSError:
            continue
        if in_session or marker in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@dataclass
class FakeCluster:
    """A fake autoscaling cluster this test started: its head process, addresses and token."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    token_path: Path
    dashboard_url: str
    log_path: Path
    worker_resource: str
    stopped: bool = field(default=False)

    def client_env(self) -> dict[str, str]:
        return _clean_environment() | {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def api(self, path: str) -> Any:
        """GET a dashboard endpoint with the token, as JSON."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has known, alive or dead (Ray's State API)."""
        return self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]

    def stop(self) -> list[str]:
        """SIGTERM the head and wait; kill by PID whatever it started that outlives it.

        Returns those processes (PID and command), empty when the head took everything down itself.
        """
        if self.stopped:
            return []
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        # The head's children may still be on their way out when it exits; give them a moment.
        _, alive = psutil.wait_procs(_processes_of(self.process.pid, self.marker), timeout=LEFTOVER_GRACE_S)
        killed = []
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                killed.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        return killed

    @property
    def marker(self) -> str:
        return f"{self.temp_dir}{os.sep}"

    def log_tail(self) -> str:
        parts = [self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""]
        for monitor_log in sorted(self.temp_dir.glob("session_*/logs/monitor.*")):
            parts.append(f"---- {monitor_log.name} ----\n{monitor_log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _short_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """A Ray temp dir short enough for its socket paths; True when it must be removed afterwards."""
    candidate = tmp_path_factory.mktemp("rf")
    if len(str(candidate)) <= MAX_TEMP_DIR_LENGTH:
        return candidate, False
    fallback = Path(tempfile.mkdtemp(prefix="rf"))
    assert len(str(fallback)) <= MAX_TEMP_DIR_LENGTH, (
        f"no temp dir short enough for Ray's sockets: {fallback}"
    )
    return fallback, True


def _wait_until_ready(cluster: FakeCluster) -> None:
    """The job API answers an authenticated request and the head has registered."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            raise AssertionError(f"ray start exited with {cluster.process.returncode}:\n{cluster.log_tail()}")
        with contextlib.suppress(urllib.error.URLError, OSError, KeyError):
            cluster.api("/api/jobs/")
            if cluster.nodes():
                return
        time.sleep(0.5)
    raise AssertionError(
        f"the fake cluster's head did not come up in {HEAD_START_TIMEOUT_S} s:\n{cluster.log_tail()}"
    )


@pytest.fixture
def fake_cluster(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    (config,) = load_yaml_documents(CLUSTER_DIR / "local-fake.yaml")
    head_type = config["available_node_types"][config["head_node_type"]]
    (worker_type,) = [
        spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]
    ]
    (worker_resource,) = set(worker_type["resources"]) - set(head_type["resources"])

    temp_dir, remove_temp_dir = _short_temp_dir(tmp_path_factory)
    ports: list[int] = []
    while len(ports) < 4:  # distinct: each probe is closed before the next one asks
        port = free_port()
        if port not in ports:
            ports.append(port)
    gcs, dashboard, agent, client = ports
    # The fake provider points every worker node it starts at this address.
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config_path = tmp_path / "local-fake.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_path.chmod(0o600)

    env = _clean_environment() | {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RAY_FAKE_CLUSTER": "1",
        "RAY_enable_autoscaler_v2": "0",
        # Decide every second instead of every five: scale-up and scale-down within the test's time.
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # The worker nodes inherit these from the autoscaler and join with the token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # Nothing to drain on a test cluster: shut down at once on SIGTERM (default: wait 30 s).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    log_path = tmp_path / "head.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                f"--temp-dir={temp_dir}",
                f"--port={gcs}",
                f"--num-cpus={head_type['resources']['CPU']}",
                f"--autoscaling-config={config_path}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: every process it starts can be found and stopped
        )
    cluster = FakeCluster(
        process=process,
        temp_dir=temp_dir,
        token_path=token_path,
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        log_path=log_path,
        worker_resource=worker_resource,
    )
    try:
        _wait_until_ready(cluster)
        yield cluster
    finally:
        cluster.stop()
        if remove_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _worker_nodes(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {node["node_id"]: node for node in nodes if not node["is_head_node"]}


def test_a_job_needing_worker_only_resources_adds_nodes_that_go_when_it_ends(
    fake_cluster: FakeCluster,
) -> None:
    (head,) = fake_cluster.nodes()
    assert head["is_head_node"] and fake_cluster.worker_resource not in head["resources_total"]

    submit = subprocess.run(
        [RAY, "job", "submit", "--", sys.executable, str(JOB), fake_cluster.worker_resource, str(WORKERS)],
        env=fake_cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    results = [
        line.removeprefix("RESULT ") for line in submit.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if submit.returncode != 0 or len(results) != 1:
        print(submit.stdout[-6000:], submit.stderr[-3000:], fake_cluster.log_tail(), sep="\n")
        pytest.fail(f"the job did not succeed (ray job submit exited {submit.returncode})")
    placed = json.loads(results[0])

    # Added: each worker ran on a node of its own that the autoscaler started for it.
    assert placed["head"] == head["node_id"]
    assert len(set(placed["workers"])) == WORKERS and head["node_id"] not in placed["workers"]
    workers = _worker_nodes(fake_cluster.nodes())
    assert set(placed["workers"]) <= set(workers)
    for node_id in placed["workers"]:
        assert workers[node_id]["resources_total"].get(fake_cluster.worker_resource) == 1

    # Removed: idle once the job is over, every worker node is terminated; the head stays.
    deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
    while any(node["state"] != "DEAD" for node in workers.values()) and time.monotonic() < deadline:
        time.sleep(1)
        workers = _worker_nodes(fake_cluster.nodes())
    states = {node_id[-5:]: (node["state"], node.get("state_message")) for node_id, node in workers.items()}
    for state, message in states.values():
        # Taken down by the autoscaler ("Expected termination: Terminated by autoscaler."), not lost.
        assert state == "DEAD" and "autoscaler" in (message or ""), (states, fake_cluster.log_tail())
    alive = [node for node in fake_cluster.nodes() if node["state"] == "ALIVE"]
    assert [node["node_id"] for node in alive] == [head["node_id"]]

    # Stopping the head leaves nothing behind: the removed nodes' processes are gone already.
    left = fake_cluster.stop()
    assert left == [], f"processes of the fake cluster still running after the head stopped: {left}"
