"""Autoscaling, end to end, on a fake multi-node cluster started from cluster/local-fake.yaml.

Ray's fake multi-node provider turns "launch a node" into "start another raylet on this machine",
so the real autoscaler makes real decisions here: a job whose workers need ``fake_gpu``, which only
the worker node type has, makes it add worker nodes; once the job is over and the nodes are idle it
removes them. Before that, the job shows that raytuner reads the node types this autoscaler can add
(a second worker type declares a GPU and is never launched) and so picks GPUs by default.

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

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.schemas import CLUSTER_DIR, load_yaml_documents
from tests.ray_head import (
    RAY,
    Head,
    free_ports,
    head_environment,
    short_temp_dir,
    start_head_process,
    write_token,
)

JOB = Path(__file__).with_name("scale_out_job.py")
WORKERS = 2
HEAD_START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 180
SCALE_DOWN_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


@dataclass
class FakeCluster(Head):
    """The fake autoscaling cluster's head, the resource only its scale-out worker type has, and
    the GPUs of each node type that declares some."""

    worker_resource: str = ""
    gpu_node_types: dict[str, float] = field(default_factory=dict)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has known, alive or dead (Ray's State API)."""
        return self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]

    def log_tail(self) -> str:
        parts = [super().log_tail()]
        for monitor_log in sorted(self.temp_dir.glob("session_*/logs/monitor.*")):
            parts.append(f"---- {monitor_log.name} ----\n{monitor_log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def fake_cluster(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    (config,) = load_yaml_documents(CLUSTER_DIR / "local-fake.yaml")
    head_type = config["available_node_types"][config["head_node_type"]]
    worker_types = {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    # The job's resource: the one a worker type has beyond the head's, GPUs aside (nothing asks for those).
    (worker_resource,) = (
        {resource for spec in worker_types.values() for resource in spec["resources"]}
        - set(head_type["resources"])
        - {"GPU"}
    )
    gpu_node_types = {
        name: spec["resources"]["GPU"] for name, spec in worker_types.items() if "GPU" in spec["resources"]
    }

    temp_dir, remove_temp_dir = short_temp_dir(tmp_path_factory, "rf")
    gcs, dashboard, agent, client = free_ports(4)
    # The fake provider points every worker node it starts at this address.
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config_path = tmp_path / "local-fake.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token_path = write_token(tmp_path / "auth_token")
    # The worker nodes inherit the head's environment from the autoscaler, and join with the token.
    env = head_environment(token_path, dashboard) | {
        "RAY_FAKE_CLUSTER": "1",
        "RAY_enable_autoscaler_v2": "0",
        # Decide every second instead of every five: scale-up and scale-down within the test's time.
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    log_path = tmp_path / "head.log"
    process = start_head_process(
        temp_dir=temp_dir,
        gcs_port=gcs,
        dashboard_port=dashboard,
        agent_port=agent,
        client_port=client,
        env=env,
        log_path=log_path,
        extra_args=[f"--num-cpus={head_type['resources']['CPU']}", f"--autoscaling-config={config_path}"],
    )
    cluster = FakeCluster(
        process=process,
        temp_dir=temp_dir,
        token_path=token_path,
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        log_path=log_path,
        stop_timeout_s=STOP_TIMEOUT_S,
        worker_resource=worker_resource,
        gpu_node_types=gpu_node_types,
    )
    try:
        cluster.wait_until_ready(HEAD_START_TIMEOUT_S, ready=cluster.nodes)
        yield cluster
    finally:
        cluster.stop()
        if remove_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _worker_nodes(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {node["node_id"]: node for node in nodes if not node["is_head_node"]}


@pytest.mark.slow
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

    # Seen by raytuner before any worker node existed: the GPU node type is read from the file the
    # autoscaler runs from (Ray 2.60's autoscaler leaves the GCS's cluster config empty; should it
    # start reporting there, raytuner.upstream can drop its file reader), so GPUs are the default.
    autoscaler = placed["autoscaler"]
    assert autoscaler["reported"] == []
    for name, gpus in fake_cluster.gpu_node_types.items():
        assert autoscaler["node_types"][name]["GPU"] == gpus
    gpus_per_worker, num_workers, reason = autoscaler["choice"]
    assert (gpus_per_worker, num_workers) == (1.0, 1), reason
    assert "autoscaler can add GPU nodes" in reason and all(
        name in reason for name in fake_cluster.gpu_node_types
    )

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
        # Taken down, not lost: the GCS records an expected termination. Its words depend on which
        # reaches it first, the autoscaler's drain ("Terminated by autoscaler.") or the fake
        # provider's SIGTERM to the node's raylet ("received SIGTERM"); the monitor's log says
        # which nodes the autoscaler removed for being idle.
        assert state == "DEAD" and (message or "").startswith("Expected termination"), (
            states,
            fake_cluster.log_tail(),
        )
    monitor_log = "\n".join(
        path.read_text(errors="replace") for path in fake_cluster.temp_dir.glob("session_*/logs/monitor.*")
    )
    removed = sum(
        int(count) for count in re.findall(r"Removing (\d+) nodes of type \S+ \(idle\)", monitor_log)
    )
    assert removed >= len(workers), fake_cluster.log_tail()
    alive = [node for node in fake_cluster.nodes() if node["state"] == "ALIVE"]
    assert [node["node_id"] for node in alive] == [head["node_id"]]

    # Stopping the head leaves nothing behind: the removed nodes' processes are gone already.
    left = fake_cluster.stop()
    assert left == [], f"processes of the fake cluster still running after the head stopped: {left}"
