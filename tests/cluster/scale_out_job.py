"""The job the fake autoscaling cluster runs: workers that only the GPU-style node type can host.

Run as ``python scale_out_job.py RESOURCE WORKERS`` inside a Ray job. It reserves one bundle per
worker in a placement group, as Ray Train does for its worker group (``PACK``, each bundle one CPU
and one unit of ``RESOURCE``), starts one actor per bundle, and prints one ``RESULT {json}`` line
with the node each worker ran on. The head node has none of ``RESOURCE``: the bundles can only be
placed once the autoscaler has added worker nodes.

First, while the cluster is only its head, it records what raytuner sees of the autoscaler: the
node types it reads (``raytuner.upstream``) and the Ray Train layout it would choose by default.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

READY_TIMEOUT_S = 120


@ray.remote(num_cpus=1)
class Worker:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def autoscaler_as_seen() -> dict[str, object]:
    """What raytuner reads of this cluster's autoscaler, and the default layout it picks from it."""
    from raytuner.placement import choose_workers, cluster_facts
    from raytuner.upstream import autoscaler_node_types, reported_node_types

    choice = choose_workers(cluster_facts(), gpus_per_worker=None, gpus_source="", num_workers=None)
    return {
        "reported": [node_type.name for node_type in reported_node_types()],
        "node_types": {node_type.name: dict(node_type.resources) for node_type in autoscaler_node_types()},
        "choice": [choice.gpus_per_worker, choice.num_workers, choice.reason],
    }


def main(resource: str, workers: int) -> None:
    ray.init()  # the job's cluster (RAY_ADDRESS is set for a job's entrypoint)
    head_node_id = ray.get_runtime_context().get_node_id()
    autoscaler = autoscaler_as_seen()
    group = placement_group([{"CPU": 1, resource: 1}] * workers, strategy="PACK")
    ray.get(group.ready(), timeout=READY_TIMEOUT_S)
    actors = [
        Worker.options(
            resources={resource: 1},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote()
        for index in range(workers)
    ]
    nodes = ray.get([actor.node_id.remote() for actor in actors])
    for actor in actors:
        ray.kill(actor)
    remove_placement_group(group)
    print(
        "RESULT " + json.dumps({"head": head_node_id, "workers": nodes, "autoscaler": autoscaler}), flush=True
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
