"""Where a run's files live when it runs on a Ray cluster, and the check that every worker sees them.

``ray job submit`` runs its entrypoint on the head node in a temporary copy of ``--working-dir``,
so a relative ``output_dir`` or cache folder would land in that copy: gone after the job, and
invisible to workers on other nodes. On a cluster (``RAY_ADDRESS`` set) raytuner therefore moves
every output and cache path that points into the working directory under one shared root,
``ray_storage_path``, and prints where everything went. The driver writes a marker with a fresh
token into that root and into ``output_dir``; each worker reads both back at start-up and stops
with a clear error when it cannot, instead of training into a folder nobody will find.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raytuner.config import RunConfig
from raytuner.config.paths import has_scheme
from raytuner.config.training import replace_options
from raytuner.errors import RaytunerError
from raytuner.storage import Location, StorageError, describe_error, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

MARKER_NAME = "raytuner_shared_root.json"


class LayoutError(RaytunerError, ValueError):
    """A one-line reason the run's files cannot be placed where every worker sees them."""


@dataclass(frozen=True, kw_only=True)
class SharedRootMarker:
    """What the driver wrote and each worker must read back, at each location."""

    locations: tuple[Location, ...]
    token: str


def on_cluster() -> bool:
    """True when raytuner joins a running cluster instead of starting a local Ray."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _inside(path: Path, folder: Path) -> Path | None:
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def _join(root: str, relative: str) -> str:
    return posixpath.join(root, relative) if has_scheme(root) else str(Path(root) / relative)


def place_under_shared_root(
    run: RunConfig, root: str, *, working_dir: Path | None = None
) -> tuple[RunConfig, list[str]]:
    """``run`` with ``output_dir`` and the cache folders inside ``working_dir`` (default: cwd)
    moved under ``root``, and one line per path moved, for the log."""
    working_dir = working_dir or Path.cwd()
    moved: list[str] = []
    relative_output = _inside(run.training.output_dir, working_dir)
    if relative_output is not None:
        if has_scheme(root):
            raise LayoutError(
                f"output_dir {relative_output} is inside the job's working directory and ray_storage_path "
                f"{root} is object storage: set output_dir to a folder on a filesystem every node mounts "
                "(writing the adapter and pictures straight to object storage is not implemented yet)"
            )
        output_dir = Path(_join(root, str(relative_output)))
        run = replace(run, training=replace(run.training, output_dir=output_dir))
        moved.append(f"output_dir -> {output_dir}")

    def under_root(value: str) -> str | None:
        relative = Path(value) if not Path(value).is_absolute() else _inside(Path(value), working_dir)
        return None if relative is None else _join(root, str(relative))

    run, changed = _rewrite_local_caches(run, under_root)
    moved.extend(f"dataset '{dataset_id}' {key} -> {value}" for dataset_id, key, value in changed)
    return run, moved


def _rewrite_local_caches(
    run: RunConfig, rewrite: Callable[[str], str | None]
) -> tuple[RunConfig, list[tuple[str, str, str]]]:
    """``run`` with ``rewrite`` applied to every local cache folder (None leaves it), and the changes.

    URIs are left alone, and so is a relative ``cache_dir_vae`` of a ``type: aws`` dataset: it is
    a prefix inside the dataset's own bucket, already shared.
    """
    changed: list[tuple[str, str, str]] = []
    datasets = []
    for dataset in run.datasets:
        changes: dict[str, Any] = {}
        for key in ("cache_dir_vae", "cache_dir"):
            value = getattr(dataset, key)
            if not value or has_scheme(value) or (dataset.type == "aws" and not value.startswith("/")):
                continue
            rewritten = rewrite(value)
            if rewritten is not None:
                changes[key] = rewritten
                changed.append((dataset.id, key, rewritten))
        datasets.append(replace(dataset, **changes) if changes else dataset)
    return replace(run, datasets=datasets), changed


def pin_local_paths(run: RunConfig, *, working_dir: Path | None = None) -> tuple[RunConfig, list[str]]:
    """``run`` with its relative local paths made absolute, against the driver's working directory.

    Ray Train starts each worker in a working directory of its own, so a relative model folder
    or cache folder would point somewhere else there. Hub ids and URIs are left alone. Also
    returns one line per model folder that only this node can see, for a warning on a cluster.
    """
    working_dir = (working_dir or Path.cwd()).resolve()
    options = run.training.flat()
    only_here = []
    pinned: dict[str, str] = {}
    for key in (
        "pretrained_model_name_or_path",
        "pretrained_vae_model_name_or_path",
        "pretrained_evaluation_model_name_or_path",
    ):
        value = options[key]
        if not value or has_scheme(value):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and (working_dir / path).is_dir():
            pinned[key] = str(working_dir / path)
            only_here.append(f"{key} {value} is inside the working directory")
    run = replace(run, training=replace_options(run.training, pinned))
    run, _ = _rewrite_local_caches(
        run, lambda value: None if Path(value).is_absolute() else str(working_dir / value)
    )
    return run, only_here


def write_marker(locations: list[Location]) -> SharedRootMarker:
    """Write a marker with a fresh token at each location (the driver, before the workers start)."""
    token = secrets.token_hex(16)
    for location in locations:
        filesystem, path = location.child(MARKER_NAME).resolve()
        try:
            write_bytes_atomic(filesystem, path, json.dumps({"token": token}).encode())
        except OSError as error:
            raise LayoutError(
                f"cannot write the shared-root marker: {describe_error(location.uri, error)}"
            ) from None
    return SharedRootMarker(locations=tuple(locations), token=token)


def check_marker(marker: SharedRootMarker, *, node: str) -> None:
    """Fail clearly when this worker cannot read the driver's marker at every location."""
    for location in marker.locations:
        problem = None
        try:
            filesystem, path = location.child(MARKER_NAME).resolve()
            seen = json.loads(read_bytes(filesystem, path)).get("token")
            if seen != marker.token:
                problem = "holds another run's marker"
        except (OSError, StorageError, ValueError) as error:
            problem = f"is not readable here ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        if problem is not None:
            raise LayoutError(
                f"worker on node {node}: {location} {problem}; the driver wrote it there. On a cluster, "
                "ray_storage_path and output_dir must be object storage or a filesystem every node mounts"
            )
