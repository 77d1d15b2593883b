"""The one place raytuner touches Ray's internals: what Ray 2.60 has no public API for.

Every function here reads (or, once, adjusts) something private to Ray and may break with any Ray
release; ``tests/test_upstream.py`` and ``tests/cluster/test_fake_autoscaling.py`` fail when the
upstream behaviour they rely on changes. Nothing else in raytuner imports ``ray._private`` or a
``_internal`` package, reads Ray's internal key-value store or looks at Ray's processes. (Ray Tune's
ASHA scheduler is the one exception: ``ResumableASHA`` in ``raytuner/tune/early_stopping.py``
subclasses it and saves its private rung tables, which only a subclass can do.)

**The node types an autoscaler can add.** raytuner trains on GPUs by default when the cluster has
them or its autoscaler can add them, and an autoscaling cluster starts with no GPU node. In Ray 2.60
the node types are in one of two places:

- the GCS's cluster config (``autoscaler_pb2.ClusterConfig`` in the ``__autoscaler`` namespace of
  the internal key-value store, read with ``ray._private.state.state.get_cluster_config()``), which
  is what Ray Train's own resource check and Ray Data's autoscaler read. It is filled only by a
  component that calls the GCS's ``ReportClusterConfig``; Ray 2.60's own autoscalers (v1 and v2)
  never do, so on a cluster started by ``ray up`` or ``ray start --autoscaling-config`` it is empty;
- the autoscaling config file itself: ``ray start --head --autoscaling-config=FILE``
  (``~/ray_bootstrap_config.yaml`` under ``ray up``) starts the autoscaler's monitor process with
  ``--autoscaling-config=FILE`` and ``--gcs-address=HOST:PORT`` on its command line. A task on the
  head node finds the monitor of this cluster by its GCS port and reads the file's node types.

KubeRay's autoscaler builds its config from the RayCluster resource, in a sidecar container, so
neither place shows its worker groups: there raytuner sees no node type it could add.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Ray gives every node a resource named after its id; the head node's is this one.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# The monitor's entry points, relative to Ray's package (ray/_private/services.py: start_monitor).
MONITOR_SCRIPTS = (
    os.path.join("ray", "autoscaler", "_private", "monitor.py"),
    os.path.join("ray", "autoscaler", "v2", "monitor.py"),
)
AUTOSCALING_CONFIG_FLAG = "--autoscaling-config"
GCS_ADDRESS_FLAG = "--gcs-address"
# Reading a small file on the head node; a head too busy to start a worker within this is
# answered as "no node type known" rather than holding the run.
HEAD_READ_TIMEOUT_S = 60


@dataclass(frozen=True, kw_only=True)
class NodeType:
    """A worker node type the autoscaler can launch: its resources and how many it may run.

    ``max_workers`` -1 means no limit of its own.
    """

    name: str
    resources: Mapping[str, float]
    max_workers: int

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


def autoscaler_node_types() -> tuple[NodeType, ...]:
    """Worker node types the connected cluster's autoscaler can add; empty when none are known.

    Read once per cluster and process: an autoscaler's node types come from the file it was started
    with, which does not change under a running cluster.
    """
    import ray

    return _node_types_of_cluster(ray.get_runtime_context().gcs_address)


@functools.cache
def _node_types_of_cluster(gcs_address: str) -> tuple[NodeType, ...]:
    return reported_node_types() or configured_node_types(gcs_address)


def reported_node_types() -> tuple[NodeType, ...]:
    """The node types in the GCS's cluster config, when something reported one."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    return node_types_from_cluster_config(config) if config is not None else ()


def node_types_from_cluster_config(config: Any) -> tuple[NodeType, ...]:
    """``autoscaler_pb2.ClusterConfig``'s node groups that may have a node (``max_count`` not 0)."""
    return tuple(
        NodeType(
            name=group.name,
            resources={name: float(amount) for name, amount in group.resources.items()},
            max_workers=int(group.max_count),
        )
        for group in config.node_group_configs
        if group.max_count != 0
    )


def configured_node_types(gcs_address: str) -> tuple[NodeType, ...]:
    """The worker node types of the config file this cluster's autoscaler runs from (read on the head)."""
    import ray

    port = int(gcs_address.rsplit(":", 1)[1])
    read_on_head = ray.remote(autoscaling_config_of_monitor).options(
        num_cpus=0, resources={HEAD_NODE_RESOURCE: 0.001}, max_retries=0
    )
    try:
        config = ray.get(read_on_head.remote(port), timeout=HEAD_READ_TIMEOUT_S)
    except ray.exceptions.RayError as error:  # a timeout, or the file unreadable there
        lines = str(error).strip().splitlines()
        logger.warning(
            "the autoscaler's node types could not be read on the head node: %s",
            lines[-1] if lines else type(error).__name__,
        )
        return ()
    return node_types_from_autoscaling_config(config) if config else ()


@dataclass(frozen=True, kw_only=True)
class MonitorProcess:
    """The autoscaler's monitor process of one cluster: its ``--flag=value`` arguments and working folder."""

    flags: Mapping[str, str]
    cwd: str


def find_monitor(gcs_port: int) -> MonitorProcess | None:
    """On the head node: the monitor process serving the GCS on ``gcs_port``, or None."""
    import psutil

    for process in psutil.process_iter(["cmdline", "cwd"]):
        arguments = process.info["cmdline"] or []
        if not any(argument.endswith(MONITOR_SCRIPTS) for argument in arguments):
            continue
        flags = dict(
            argument.split("=", 1) for argument in arguments if argument.startswith("--") and "=" in argument
        )
        if flags.get(GCS_ADDRESS_FLAG, "").endswith(f":{gcs_port}"):
            return MonitorProcess(flags=flags, cwd=process.info["cwd"] or "/")
    return None


def autoscaling_config_of_monitor(gcs_port: int) -> dict[str, Any] | None:
    """On the head node: the node-type part of the autoscaling config of the monitor serving ``gcs_port``.

    None when no monitor of that cluster runs here, or it runs without a config file (a cluster of
    fixed size, or one whose autoscaler gets its config elsewhere, as KubeRay's does).
    """
    import yaml

    monitor = find_monitor(gcs_port)
    if monitor is None or AUTOSCALING_CONFIG_FLAG not in monitor.flags:
        return None
    path = Path(os.path.expanduser(monitor.flags[AUTOSCALING_CONFIG_FLAG]))
    if not path.is_absolute():  # relative to where `ray start` ran, which the monitor inherits
        path = Path(monitor.cwd) / path
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {key: raw.get(key) for key in ("max_workers", "head_node_type", "available_node_types")}


def node_types_from_autoscaling_config(config: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker node types of an autoscaling config (a cluster YAML) that may have a node.

    A type without ``max_workers`` may have as many as the cluster's ``max_workers``; a type without
    ``resources`` is one whose resources the cloud provider fills in, unknown here (no GPU counted).
    """
    cluster_limit = -1 if config.get("max_workers") is None else int(config["max_workers"])
    if cluster_limit == 0:
        return ()
    head = config.get("head_node_type")
    node_types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        limit = int(spec.get("max_workers", cluster_limit))
        if name == head or limit == 0:
            continue
        resources = {key: float(amount) for key, amount in (spec.get("resources") or {}).items()}
        node_types.append(NodeType(name=name, resources=resources, max_workers=limit))
    return tuple(node_types)


def quiet_train_report_logs() -> None:
    """Ray Train logs every report at INFO; raytuner's progress line says the same every few seconds.

    Its logger is the module's own, named after the file of ``ray.train.v2._internal.execution.context``.
    """
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(logging.WARNING)
