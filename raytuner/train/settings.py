"""How a run is laid out on Ray: workers, their resources, failures, and where state is stored.

raytuner's own ``ray_*`` keys of ``config.json`` and the matching ``raytuner train`` flags (a flag
wins over the key). Sizing never looks at the cluster: an autoscaling cluster starts with no GPU
node, and the request itself is what makes the autoscaler add one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from raytuner.config import RunConfig
from raytuner.config.paths import has_scheme
from raytuner.storage import Location

# A run's name under the storage path; Ray Train restores a run given the same name and path.
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


class SettingsError(ValueError):
    """A one-line reason the run cannot be laid out on Ray as configured."""


@dataclass(frozen=True, kw_only=True)
class RaySettings:
    """The ``ray_*`` keys, resolved; ``storage_path`` is filled in by :func:`resolve_settings`."""

    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    storage_path: str
    max_failures: int

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(frozen=True, kw_only=True)
class RayOverrides:
    """``raytuner train`` flags; None leaves the config's key (or its default) in force."""

    num_workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    storage_path: str | None = None
    max_failures: int | None = None


DEFAULT_CPUS_PER_WORKER = 1.0


def resolve_settings(run: RunConfig, overrides: RayOverrides | None = None) -> RaySettings:
    """The run's Ray layout from ``config.json`` and the flags; checkpoints default under ``output_dir``.

    ``ray_num_workers`` defaults to SimpleTuner's ``num_processes`` (one process per GPU there),
    else 1. ``ray_gpus_per_worker`` defaults to 0: a CPU run unless GPUs are asked for.
    """
    overrides = overrides or RayOverrides()
    training = run.training
    num_workers = overrides.num_workers or training.ray_num_workers or training.num_processes or 1
    if num_workers < 1:
        raise SettingsError(f"ray_num_workers = {num_workers}: expected 1 or more")
    gpus = _first(overrides.gpus_per_worker, training.ray_gpus_per_worker, 0.0)
    cpus = _first(overrides.cpus_per_worker, training.ray_cpus_per_worker, DEFAULT_CPUS_PER_WORKER)
    if gpus < 0 or cpus <= 0:
        raise SettingsError(
            f"ray_gpus_per_worker = {gpus}, ray_cpus_per_worker = {cpus}: expected GPUs >= 0 and CPUs > 0"
        )
    max_failures = int(_first(overrides.max_failures, training.ray_max_failures, 0))
    if max_failures < -1:
        raise SettingsError(f"ray_max_failures = {max_failures}: expected -1 (no limit), 0 or more")
    storage = overrides.storage_path or training.ray_storage_path
    if storage is None:
        storage = str(training.output_dir / "ray")
    elif not has_scheme(storage):
        storage = str(Path(storage).expanduser().resolve())
    return RaySettings(
        num_workers=num_workers,
        gpus_per_worker=float(gpus),
        cpus_per_worker=float(cpus),
        storage_path=storage.rstrip("/"),
        max_failures=max_failures,
    )


def _first(*values: float | int | None) -> float:
    for value in values:
        if value is not None:
            return float(value)
    raise AssertionError("no default given")


def run_name(run: RunConfig) -> str:
    """A stable name for the run: the output folder's name plus a short hash of its full path.

    Stable, so running the same config again finds the same run (Ray Train's restore); hashed, so
    two output folders with the same last name never share checkpoints.
    """
    output_dir = str(run.training.output_dir)
    stem = _NAME_CHARACTERS.sub("-", Path(output_dir).name).strip("-") or "run"
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:8]
    return f"raytuner-{stem}-{digest}"


def storage_filesystem(settings: RaySettings) -> tuple[object | None, str]:
    """What Ray Train's RunConfig takes: a pyarrow filesystem for object storage (S3 endpoint
    from the environment), else None and the local path."""
    if not has_scheme(settings.storage_path):
        return None, settings.storage_path
    filesystem, path = Location(uri=settings.storage_path).resolve()
    return filesystem, path
