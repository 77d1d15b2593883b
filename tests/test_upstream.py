"""What raytuner reads from Ray's internals (raytuner/upstream.py) still reads the same in this Ray.

Each test here fails when the upstream behaviour it relies on changes: the GCS cluster config's
message, the autoscaling config's node types, the monitor process's command line, the module Ray
Train logs its reports from. The end-to-end check on a running autoscaler is in
tests/cluster/test_fake_autoscaling.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from raytuner import upstream
from raytuner.placement import cluster_facts
from tests.cluster.schemas import CLUSTER_DIR
from tests.ray_cluster import RayCluster


def test_the_gcs_cluster_config_lists_node_groups_that_may_have_a_node() -> None:
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in (
        ("gpu", {"CPU": 8, "GPU": 1}, 4),
        ("cpu", {"CPU": 16}, -1),
        ("disabled", {"CPU": 2, "GPU": 8}, 0),
    ):
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    node_types = upstream.node_types_from_cluster_config(config)
    assert [(node.name, node.gpus, node.max_workers) for node in node_types] == [
        ("gpu", 1.0, 4),
        ("cpu", 0.0, -1),
    ]


@pytest.mark.parametrize(
    ("config_file", "gpu_types"),
    [
        ("aws.yaml", {"ray.worker.gpu_spot": 1.0, "ray.worker.gpu_on_demand": 1.0}),
        ("gcp.yaml", {"ray_worker_gpu_spot": 1.0, "ray_worker_gpu_on_demand": 1.0}),
        ("local-fake.yaml", {"fake.logical_gpu": 1.0}),
    ],
)
def test_the_cluster_yamls_worker_types_are_read_with_their_gpus(
    config_file: str, gpu_types: dict[str, float]
) -> None:
    config = yaml.safe_load((CLUSTER_DIR / config_file).read_text())
    node_types = upstream.node_types_from_autoscaling_config(config)
    assert config["head_node_type"] not in {node.name for node in node_types}
    assert {node.name: node.gpus for node in node_types if node.gpus} == gpu_types


def test_a_cluster_capped_at_no_workers_or_types_capped_at_none_add_nothing() -> None:
    types = {"head": {"resources": {"CPU": 4}}, "gpu": {"resources": {"GPU": 1}, "max_workers": 2}}
    capped = {"max_workers": 0, "head_node_type": "head", "available_node_types": types}
    assert upstream.node_types_from_autoscaling_config(capped) == ()
    types["gpu"]["max_workers"] = 0
    assert upstream.node_types_from_autoscaling_config({**capped, "max_workers": 4}) == ()
    # A type without max_workers of its own may have as many as the cluster.
    del types["gpu"]["max_workers"]
    (gpu,) = upstream.node_types_from_autoscaling_config({**capped, "max_workers": 4})
    assert (gpu.name, gpu.max_workers) == ("gpu", 4)


def test_both_autoscalers_monitors_are_started_from_the_scripts_raytuner_looks_for() -> None:
    from ray._private import services

    started = {
        os.path.join(services.RAY_PATH, folder, "monitor.py")
        for folder in (services.AUTOSCALER_PRIVATE_DIR, services.AUTOSCALER_V2_DIR)
    }
    assert all(Path(script).is_file() for script in started)
    assert all(script.endswith(upstream.MONITOR_SCRIPTS) for script in started)


def test_on_a_ray_without_an_autoscaling_config_the_monitor_is_found_and_no_node_type_is_read(
    ray_cluster: RayCluster,
) -> None:
    import ray

    gcs_address = ray.get_runtime_context().gcs_address
    port = int(gcs_address.rsplit(":", 1)[1])
    # The test suite's Ray runs on this machine: its monitor is found by the GCS port it serves.
    monitor = upstream.find_monitor(port)
    assert monitor is not None and monitor.flags[upstream.GCS_ADDRESS_FLAG].endswith(f":{port}")
    assert upstream.AUTOSCALING_CONFIG_FLAG not in monitor.flags
    assert upstream.reported_node_types() == ()
    assert upstream.configured_node_types(gcs_address) == ()  # read through a task on the head node
    facts = cluster_facts()
    assert not facts.local and facts.gpu_node_types == ()
    assert facts.cluster_gpus == int(ray.cluster_resources().get("GPU", 0))


def test_ray_train_report_logs_are_quieted_on_the_logger_ray_train_uses() -> None:
    from ray.train.v2._internal.execution import context

    upstream.quiet_train_report_logs()
    # The logger Ray Train 2.60 reports through is named after the module's file, not the module.
    assert logging.getLogger(context.__file__).level == logging.WARNING
