"""How a run is laid out on Ray: workers, their resources, failures, and where state is stored.

raytuner's own ``ray_*`` keys of ``config.json`` and the matching ``raytuner train`` flags (a flag
wins over the key). What they leave open is chosen from the cluster, as SimpleTuner uses the GPUs
it finds (:mod:`raytuner.placement`): GPUs when the cluster has them or its autoscaler can add GPU
nodes, one worker per GPU it has now. The files are checked first (:func:`read_settings`, before
Ray is reached); the cluster is asked only once connected, or, for a local Ray about to start,
this machine's CUDA devices are (:meth:`RayRequest.settle`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raytuner.config import RunConfig
from raytuner.config.paths import display, has_scheme
from raytuner.errors import RaytunerError
from raytuner.placement import ClusterFacts, choose_workers, cluster_facts, needs_cluster
from raytuner.storage import Location

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# A run's name under the storage path; Ray Train restores a run given the same name and path.
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


class SettingsError(RaytunerError, ValueError):
    """A one-line reason the run cannot be laid out on Ray as configured."""


@dataclass(frozen=True, kw_only=True)
class RaySettings:
    """The ``ray_*`` keys, resolved: as given, or chosen from the cluster (``placement`` says why)."""

    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    storage_path: str
    max_failures: int
    placement: str = ""  # why these GPUs and workers, for the start-of-run line

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def describe(self) -> str:
        """The workers, their resources and why, as the start-of-run line shows them."""
        layout = (
            f"{self.num_workers} worker(s) x {{CPU: {self.cpus_per_worker:g}, GPU: {self.gpus_per_worker:g}}}"
        )
        return f"{layout} ({self.placement})" if self.placement else layout


@dataclass(frozen=True, kw_only=True)
class RayOverrides:
    """``raytuner train`` flags; None leaves the config's key (or its default) in force.

    ``gpus_source`` names where ``gpus_per_worker`` was given, for the start-of-run line
    (``raytuner tune`` passes its sweep file's ``resources_per_trial`` here).
    """

    num_workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    storage_path: str | None = None
    max_failures: int | None = None
    gpus_source: str = "--ray-gpus-per-worker"


DEFAULT_CPUS_PER_WORKER = 1.0


@dataclass(frozen=True, kw_only=True)
class RayRequest:
    """The ``ray_*`` keys and flags, checked; ``None`` where the cluster decides.

    ``num_workers`` is ``ray_num_workers`` (or its flag), else SimpleTuner's ``num_processes``;
    ``gpus_source`` says where a given ``gpus_per_worker`` came from.
    """

    num_workers: int | None
    gpus_per_worker: float | None
    gpus_source: str
    cpus_per_worker: float
    storage_path: str
    max_failures: int

    @property
    def needs_cluster(self) -> bool:
        return needs_cluster(gpus_per_worker=self.gpus_per_worker, num_workers=self.num_workers)

    def settle(self, cluster: ClusterFacts | None = None) -> RaySettings:
        """The layout, with what is left open chosen from ``cluster``: gathered now when needed and not given."""
        if cluster is None and self.needs_cluster:
            cluster = cluster_facts()
        choice = choose_workers(
            cluster,
            gpus_per_worker=self.gpus_per_worker,
            gpus_source=self.gpus_source,
            num_workers=self.num_workers,
        )
        return RaySettings(
            num_workers=choice.num_workers,
            gpus_per_worker=choice.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
            storage_path=self.storage_path,
            max_failures=self.max_failures,
            placement=choice.reason,
        )


def read_settings(run: RunConfig, overrides: RayOverrides | None = None) -> RayRequest:
    """The ``ray_*`` keys and flags of a run, checked without Ray; checkpoints default under ``output_dir``."""
    overrides = overrides or RayOverrides()
    training = run.training
    num_workers = overrides.num_workers or training.ray.ray_num_workers or training.ray.num_processes
    if num_workers is not None and num_workers < 1:
        raise SettingsError(f"ray_num_workers = {num_workers}: expected 1 or more")
    gpus, gpus_source = _given_gpus(run, overrides)
    cpus = _first(overrides.cpus_per_worker, training.ray.ray_cpus_per_worker, DEFAULT_CPUS_PER_WORKER)
    if (gpus is not None and gpus < 0) or cpus <= 0:
        raise SettingsError(
            f"ray_gpus_per_worker = {gpus}, ray_cpus_per_worker = {cpus}: expected GPUs >= 0 and CPUs > 0"
        )
    max_failures = int(_first(overrides.max_failures, training.ray.ray_max_failures, 0))
    if max_failures < -1:
        raise SettingsError(f"ray_max_failures = {max_failures}: expected -1 (no limit), 0 or more")
    storage = overrides.storage_path or training.ray.ray_storage_path
    if storage is None:
        storage = str(training.output_dir / "ray")
    elif not has_scheme(storage):
        storage = str(Path(storage).expanduser().resolve())
    return RayRequest(
        num_workers=num_workers,
        gpus_per_worker=gpus,
        gpus_source=gpus_source,
        cpus_per_worker=float(cpus),
        storage_path=storage.rstrip("/"),
        max_failures=max_failures,
    )


def resolve_settings(
    run: RunConfig, overrides: RayOverrides | None = None, *, cluster: ClusterFacts | None = None
) -> RaySettings:
    """:func:`read_settings`, settled: what it leaves open chosen from ``cluster`` (gathered when None).

    Gathering needs the cluster connected when ``RAY_ADDRESS`` names one; with none named and none
    connected it reads this machine's CUDA devices, for the local Ray that would start.
    """
    return read_settings(run, overrides).settle(cluster)


def _given_gpus(run: RunConfig, overrides: RayOverrides) -> tuple[float | None, str]:
    """``gpus_per_worker`` from the flag or the key, and where it came from; None when neither sets it."""
    if overrides.gpus_per_worker is not None:
        return float(overrides.gpus_per_worker), f"{overrides.gpus_source} {overrides.gpus_per_worker:g}"
    value = run.training.ray.ray_gpus_per_worker
    if value is not None:
        return float(value), f"ray_gpus_per_worker = {value:g} in {display(run.sources['config'])}"
    return None, ""


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


def storage_filesystem(settings: RaySettings) -> tuple[pafs.FileSystem | None, str]:
    """What Ray Train's RunConfig takes: a pyarrow filesystem for object storage (S3 endpoint
    from the environment), else None and the local path."""
    if not has_scheme(settings.storage_path):
        return None, settings.storage_path
    filesystem, path = Location(uri=settings.storage_path).resolve()
    return filesystem, path
