"""GPUs by default: where training workers and encoding actors run when the config does not say.

SimpleTuner trains on the GPU without being asked, and ``accelerate`` starts one process per GPU
of the machine. raytuner does the same on Ray: left unset, ``ray_gpus_per_worker`` is 1 when the
cluster has GPUs now or its autoscaler can add GPU nodes (an autoscaling cluster starts with none,
and a request for a GPU is what makes it add one), and ``ray_num_workers`` is one worker per GPU
the cluster has now. A local Ray that raytuner is about to start gets this machine's CUDA devices.

The decision (:func:`choose_workers`, :func:`actor_gpus`) is a pure function of
:class:`ClusterFacts`; :func:`cluster_facts` gathers those from the connected Ray, its autoscaler's
node types (:mod:`raytuner.upstream`) or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raytuner.ray_runtime import local_ray_running, ray_pending_locally


@dataclass(frozen=True, kw_only=True)
class ClusterFacts:
    """What decides where work runs: the GPUs of the Ray cluster, now and addable, or of this machine.

    ``local``: no Ray is connected and none is named, so raytuner will start one on this machine,
    which gets its ``cuda_devices``. Otherwise ``cluster_gpus`` is what the connected cluster has
    now and ``gpu_node_types`` names the node types with GPUs its autoscaler can add.
    """

    local: bool = False
    cluster_gpus: int = 0
    gpu_node_types: tuple[str, ...] = ()
    cuda_devices: int = 0

    @property
    def gpus_now(self) -> int:
        return self.cuda_devices if self.local else self.cluster_gpus

    @property
    def can_add_gpus(self) -> bool:
        return not self.local and bool(self.gpu_node_types)

    @property
    def offers_gpus(self) -> bool:
        return self.gpus_now > 0 or self.can_add_gpus

    def describe(self) -> str:
        """What the cluster offers, in the words of the start-of-run line."""
        if self.local:
            if self.cuda_devices:
                return f"this machine has {_count(self.cuda_devices, 'CUDA device')} (a local Ray)"
            return "no CUDA device on this machine (a local Ray)"
        if self.cluster_gpus:
            return f"the cluster has {_count(self.cluster_gpus, 'GPU')}"
        if self.gpu_node_types:
            return (
                "the cluster has no GPU yet but its autoscaler can add GPU nodes "
                f"({', '.join(self.gpu_node_types)})"
            )
        return "no GPU on this Ray cluster and its autoscaler has no GPU node type"


@dataclass(frozen=True, kw_only=True)
class WorkerChoice:
    """Ray Train's layout as chosen, and why (for the start-of-run line)."""

    gpus_per_worker: float
    num_workers: int
    reason: str


def needs_cluster(*, gpus_per_worker: float | None, num_workers: int | None) -> bool:
    """Whether :func:`choose_workers` needs :class:`ClusterFacts` for these given values."""
    return gpus_per_worker is None or (num_workers is None and gpus_per_worker > 0)


def choose_workers(
    cluster: ClusterFacts | None,
    *,
    gpus_per_worker: float | None,
    gpus_source: str,
    num_workers: int | None,
) -> WorkerChoice:
    """GPUs per worker and workers: given values win; what is left open follows ``cluster``.

    ``gpus_source`` says where a given ``gpus_per_worker`` came from ("ray_gpus_per_worker = 0 in
    config.json"); ``num_workers`` is the one given (``ray_num_workers`` or ``num_processes``) or None.
    Left open with GPUs chosen, the workers are one per GPU the cluster has now, at least one. A
    worker count given beyond the GPUs of a cluster that cannot add any trains on CPUs: asking
    for GPUs that will never come would wait forever.
    """
    if gpus_per_worker is not None:
        return _given_gpus(cluster, gpus_per_worker, gpus_source, num_workers)
    if cluster is None:
        raise ValueError("ray_gpus_per_worker is left to the cluster but no ClusterFacts were given")
    if not cluster.offers_gpus:
        return WorkerChoice(
            gpus_per_worker=0.0, num_workers=num_workers or 1, reason=f"CPU: {cluster.describe()}"
        )
    if num_workers is None:
        workers = workers_for_gpus(cluster.gpus_now, 1.0)
        count = "one worker per GPU" if cluster.gpus_now else "1 worker"
        return WorkerChoice(
            gpus_per_worker=1.0,
            num_workers=workers,
            reason=f"1 GPU per worker, {count}: {cluster.describe()}",
        )
    if num_workers > cluster.gpus_now and not cluster.can_add_gpus:
        fixed = "" if cluster.local else " and its autoscaler has no GPU node type"
        return WorkerChoice(
            gpus_per_worker=0.0,
            num_workers=num_workers,
            reason=f"CPU: {num_workers} workers asked for, one GPU each, but {cluster.describe()}{fixed}",
        )
    return WorkerChoice(
        gpus_per_worker=1.0, num_workers=num_workers, reason=f"1 GPU per worker: {cluster.describe()}"
    )


def _given_gpus(
    cluster: ClusterFacts | None, gpus_per_worker: float, source: str, num_workers: int | None
) -> WorkerChoice:
    if gpus_per_worker == 0:
        return WorkerChoice(gpus_per_worker=0.0, num_workers=num_workers or 1, reason=f"CPU: {source}")
    reason = f"{gpus_per_worker:g} GPU per worker: {source}"
    if num_workers is not None:
        return WorkerChoice(gpus_per_worker=gpus_per_worker, num_workers=num_workers, reason=reason)
    if cluster is None:
        raise ValueError("ray_num_workers is left to the cluster but no ClusterFacts were given")
    workers = workers_for_gpus(cluster.gpus_now, gpus_per_worker)
    per = "GPU" if gpus_per_worker == 1 else f"{gpus_per_worker:g} GPUs"
    count = f"one worker per {per}" if cluster.gpus_now else "1 worker"
    return WorkerChoice(
        gpus_per_worker=gpus_per_worker,
        num_workers=workers,
        reason=f"{reason}; {count}: {cluster.describe()}",
    )


def workers_for_gpus(gpus: int, gpus_per_worker: float) -> int:
    """As many workers of ``gpus_per_worker`` as ``gpus`` hold, at least one."""
    return max(1, math.floor(gpus / gpus_per_worker + 1e-9))


def actor_gpus(cluster: ClusterFacts) -> int:
    """GPUs each encoding or rendering actor asks for: one when the cluster has or can add GPUs.

    With none yet but an autoscaler that can add GPU nodes, the request is what adds one.
    """
    return 1 if cluster.offers_gpus else 0


def default_actor_count(cluster: ClusterFacts) -> int:
    """Actors in a pool when the command does not say: one per GPU the cluster has now, at least one."""
    return max(1, cluster.gpus_now)


def cluster_facts() -> ClusterFacts:
    """What the connected Ray cluster reports, or, for a local Ray not started yet, this machine's CUDA devices.

    The autoscaler's node types are not read for a local Ray that raytuner started: it has none.
    """
    import ray

    if ray_pending_locally():
        return local_facts()
    if not ray.is_initialized():
        raise RuntimeError(
            "connect to the cluster at RAY_ADDRESS (cluster_connection) before asking what it offers"
        )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    node_types: tuple[str, ...] = ()
    if not local_ray_running():
        from raytuner.upstream import autoscaler_node_types

        node_types = tuple(node.name for node in autoscaler_node_types() if node.gpus > 0)
    return ClusterFacts(cluster_gpus=gpus, gpu_node_types=node_types, cuda_devices=local_facts().cuda_devices)


def local_facts() -> ClusterFacts:
    """This machine, for a local Ray that raytuner would start here: its CUDA devices."""
    import torch

    return ClusterFacts(local=True, cuda_devices=torch.cuda.device_count())


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
