"""How each raytuner process logs, set once where the process starts, never on import.

Three kinds of process: the ``raytuner`` command (:func:`set_up_command`, from its ``main``), every
Ray worker of a job raytuner connects (:func:`set_up_ray_worker`, Ray's
``worker_process_setup_hook``, which runs before the worker's first task and so before it imports
diffusers), and a Ray Train worker (:func:`set_up_train_worker`, where ``train_loop_per_worker``
starts). Which third-party loggers are lowered, and why, is in ``raytuner/upstream.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from raytuner.upstream import quiet_third_party_logs, quiet_train_report_logs

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray imports the hook by this name in each worker process (raytuner is installed on every node).
RAY_WORKER_SETUP_HOOK = "raytuner.logs.set_up_ray_worker"


def set_up_command(*, verbose: bool) -> None:
    """The ``raytuner`` command's logging: INFO (DEBUG with ``--verbose``) on stderr, libraries quieted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S"
    )
    quiet_third_party_logs(verbose=verbose)


def set_up_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for raytuner's jobs: libraries quieted before any task runs."""
    quiet_third_party_logs()


def set_up_train_worker() -> None:
    """A Ray Train worker's logging: INFO, libraries and Ray Train's per-report lines quieted."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_third_party_logs()
    quiet_train_report_logs()


def ray_job_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime env raytuner connects to Ray with: each worker sets up its logs, with ``env_vars``."""
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": RAY_WORKER_SETUP_HOOK}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env
