"""GPUs by default, branch by branch: the choice is a pure function of what the cluster reports (no Ray)."""

from __future__ import annotations

import pytest

from raytuner.placement import (
    ClusterFacts,
    WorkerChoice,
    actor_gpus,
    choose_workers,
    default_actor_count,
    needs_cluster,
    workers_for_gpus,
)

EIGHT_GPUS = ClusterFacts(cluster_gpus=8)
AUTOSCALER_ONLY = ClusterFacts(gpu_node_types=("gpu-spot", "gpu-ondemand"))
NO_GPU = ClusterFacts()
LOCAL_TWO_CUDA = ClusterFacts(local=True, cuda_devices=2)
LOCAL_NO_CUDA = ClusterFacts(local=True)


def choose(
    cluster: ClusterFacts | None, *, gpus: float | None = None, workers: int | None = None
) -> WorkerChoice:
    source = "" if gpus is None else f"ray_gpus_per_worker = {gpus:g} in config.json"
    return choose_workers(cluster, gpus_per_worker=gpus, gpus_source=source, num_workers=workers)


@pytest.mark.parametrize(
    ("cluster", "expected", "reason"),
    [
        (EIGHT_GPUS, (1.0, 8), "1 GPU per worker, one worker per GPU: the cluster has 8 GPUs"),
        (
            AUTOSCALER_ONLY,
            (1.0, 1),
            "1 GPU per worker, 1 worker: the cluster has no GPU yet but its autoscaler can add GPU nodes "
            "(gpu-spot, gpu-ondemand)",
        ),
        (NO_GPU, (0.0, 1), "CPU: no GPU on this Ray cluster and its autoscaler has no GPU node type"),
        (
            LOCAL_TWO_CUDA,
            (1.0, 2),
            "1 GPU per worker, one worker per GPU: this machine has 2 CUDA devices (a local Ray)",
        ),
        (LOCAL_NO_CUDA, (0.0, 1), "CPU: no CUDA device on this machine (a local Ray)"),
        # GPUs now and an autoscaler that can add more: the workers are sized from the GPUs up now.
        (ClusterFacts(cluster_gpus=1, gpu_node_types=("gpu",)), (1.0, 1), "the cluster has 1 GPU"),
    ],
)
def test_left_unset_gpus_and_workers_follow_the_cluster(
    cluster: ClusterFacts, expected: tuple[float, int], reason: str
) -> None:
    choice = choose(cluster)
    assert (choice.gpus_per_worker, choice.num_workers) == expected
    assert reason in choice.reason


def test_an_explicit_zero_trains_on_cpus_whatever_the_cluster_has() -> None:
    for cluster in (EIGHT_GPUS, AUTOSCALER_ONLY, LOCAL_TWO_CUDA, None):
        choice = choose(cluster, gpus=0)
        assert (choice.gpus_per_worker, choice.num_workers) == (0.0, 1)
        assert choice.reason == "CPU: ray_gpus_per_worker = 0 in config.json"
    assert choose(EIGHT_GPUS, gpus=0, workers=3).num_workers == 3
    # Nothing to ask the cluster: the run is laid out from the config alone.
    assert not needs_cluster(gpus_per_worker=0, num_workers=None)


def test_explicit_values_win_and_open_ones_are_sized_from_the_gpus_up_now() -> None:
    given = choose(NO_GPU, gpus=1, workers=4)  # an autoscaler may still add them: the request stands
    assert (given.gpus_per_worker, given.num_workers) == (1.0, 4)
    assert given.reason == "1 GPU per worker: ray_gpus_per_worker = 1 in config.json"
    assert not needs_cluster(gpus_per_worker=1, num_workers=4)
    two_each = choose(EIGHT_GPUS, gpus=2)
    assert (two_each.gpus_per_worker, two_each.num_workers) == (2.0, 4)
    assert two_each.reason.endswith("; one worker per 2 GPUs: the cluster has 8 GPUs")
    assert choose(AUTOSCALER_ONLY, gpus=1).num_workers == 1
    # num_processes (or ray_num_workers) given, GPUs left open: GPUs chosen, workers as given.
    assert (choose(EIGHT_GPUS, workers=4).gpus_per_worker, choose(EIGHT_GPUS, workers=4).num_workers) == (
        1.0,
        4,
    )
    assert choose(AUTOSCALER_ONLY, workers=4).gpus_per_worker == 1.0


def test_more_workers_than_a_fixed_cluster_has_gpus_train_on_cpus_rather_than_wait_forever() -> None:
    choice = choose(LOCAL_TWO_CUDA, workers=4)
    assert (choice.gpus_per_worker, choice.num_workers) == (0.0, 4)
    assert (
        choice.reason
        == "CPU: 4 workers asked for, one GPU each, but this machine has 2 CUDA devices (a local Ray)"
    )
    on_cluster = choose(ClusterFacts(cluster_gpus=2), workers=4)
    assert on_cluster.gpus_per_worker == 0.0
    assert on_cluster.reason.endswith("the cluster has 2 GPUs and its autoscaler has no GPU node type")
    # An autoscaler that can add GPU nodes gets the request instead.
    assert choose(ClusterFacts(cluster_gpus=2, gpu_node_types=("gpu",)), workers=4).gpus_per_worker == 1.0


def test_what_is_left_open_needs_cluster_facts() -> None:
    assert needs_cluster(gpus_per_worker=None, num_workers=2)
    assert needs_cluster(gpus_per_worker=1, num_workers=None)
    with pytest.raises(ValueError, match="no ClusterFacts"):
        choose(None)
    with pytest.raises(ValueError, match="no ClusterFacts"):
        choose(None, gpus=1)


def test_workers_for_gpus_is_at_least_one() -> None:
    assert [workers_for_gpus(gpus, 1) for gpus in (0, 1, 8)] == [1, 1, 8]
    assert workers_for_gpus(3, 2) == 1 and workers_for_gpus(3, 0.5) == 6


def test_encoding_and_rendering_actors_ask_for_a_gpu_when_the_cluster_has_or_can_add_one() -> None:
    assert [actor_gpus(cluster) for cluster in (EIGHT_GPUS, AUTOSCALER_ONLY, NO_GPU)] == [1, 1, 0]
    # One actor per GPU up now; an autoscaling cluster with none yet starts with one, which adds a node.
    assert [default_actor_count(cluster) for cluster in (EIGHT_GPUS, AUTOSCALER_ONLY, NO_GPU)] == [8, 1, 1]
    # A CPU-only machine's local Ray, as before: no GPU asked for, one actor.
    local_cpu_ray = ClusterFacts(cluster_gpus=0)
    assert (actor_gpus(local_cpu_ray), default_actor_count(local_cpu_ray)) == (0, 1)
