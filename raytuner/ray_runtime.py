"""Connecting to Ray: the cluster a job was submitted to, ``RAY_ADDRESS``, or a local Ray.

A local Ray declares more logical CPUs than the machine has cores: Ray resources are logical,
and with only as many as there are cores the Ray Train workers take them all and Ray Data's read
tasks wait forever behind them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raytuner.errors import RaytunerError
from raytuner.logs import RAY_WORKER_SETUP_HOOK, ray_job_runtime_env

logger = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 8


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Whether the connected Ray is a local one that ray_session started (and will stop).
_local_ray_running = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def local_logical_cpus() -> int:
    return max(MIN_LOCAL_CPUS, 2 * (os.cpu_count() or 1))


@contextmanager
def ray_session(*, dashboard: bool = False) -> Iterator[None]:
    """Use the Ray already connected, the cluster at ``RAY_ADDRESS``, or start (and stop) a local one.

    A Ray connected here runs ``raytuner.logs.set_up_ray_worker`` in each of its worker processes
    before their first task (Ray's ``worker_process_setup_hook``).

    ``dashboard`` starts the local Ray's dashboard on 127.0.0.1 (never a public address): Ray
    Train's clean-up of finished runs queries the State API it serves, and its Train pages show
    the run's workers.
    """
    import ray

    global _local_ray_running
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=ray_job_runtime_env())
        except ValueError as error:
            # Inside `ray job submit`, Ray merges the job's runtime env with this one and refuses
            # a field both set: here only the worker set-up hook can collide.
            if "runtime env" not in str(error):
                raise
            raise RaytunerError(
                f"RAY_ADDRESS={address}: the job's runtime env sets worker_process_setup_hook, and "
                f"raytuner sets its own ({RAY_WORKER_SETUP_HOOK}); drop it from the job's "
                "--runtime-env, or set RAY_OVERRIDE_JOB_RUNTIME_ENV=1 to let raytuner's replace it"
            ) from error
    else:
        cpus = local_logical_cpus()
        logger.info("starting a local Ray with %d logical CPUs (set RAY_ADDRESS to use a cluster)", cpus)
        options: dict[str, Any] = {"include_dashboard": False, "runtime_env": ray_job_runtime_env()}
        if dashboard:
            port = free_port()
            options = {
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": port,
                # Ray Train's placement-group cleaner asks the State API for its controller without
                # an address, which otherwise means the last Ray started on this machine: with two
                # Rays up it would ask the wrong one and remove a live run's workers.
                "runtime_env": ray_job_runtime_env({API_SERVER_ENV: f"http://127.0.0.1:{port}"}),
            }
        # address="local": a Ray of our own, never one another process started on this machine.
        ray.init(address="local", num_cpus=cpus, log_to_driver=True, **options)
        _local_ray_running = True
    try:
        yield
    finally:
        ray.shutdown()
        _local_ray_running = False


def local_ray_running() -> bool:
    """True while a local Ray that :func:`ray_session` started is up: a Ray with no autoscaler."""
    return _local_ray_running


def ray_pending_locally() -> bool:
    """True when no Ray is connected and none is named (``RAY_ADDRESS``): ray_session would start one here."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


@contextmanager
def cluster_connection() -> Iterator[None]:
    """Connected to the cluster at ``RAY_ADDRESS`` for the block, when one is named and none is connected.

    What the cluster offers is known only once connected; a local Ray is not started here (its
    GPUs are this machine's), so everything checked inside the block before :func:`ray_session`
    is still checked before a local Ray starts.
    """
    import ray

    if ray.is_initialized() or not os.environ.get("RAY_ADDRESS"):
        yield
        return
    with ray_session():
        yield


@contextmanager
def original_map_errors() -> Iterator[None]:
    """Ray Data hands the driver a map function's exception as raised (inside ``RayTaskError``).

    By default Ray Data raises a ``UserCodeException`` from it, and pickling drops that one's
    ``__cause__``: the driver would get a raytuner error (a dataset a node cannot read) only as
    the text of a traceback. The driver's Data context is restored after the block.
    """
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.raise_original_map_exception
    context.raise_original_map_exception = True
    try:
        yield
    finally:
        context.raise_original_map_exception = saved
