"""Latents encoded on the training workers: SimpleTuner's ``vae_cache_ondemand`` and
``vae_cache_clear_each_epoch``.

For such a dataset the build still lists, probes, buckets, crops and keys every image, but runs no
VAE: each image it would encode gets a *pending* row instead, in a ``pending-*.parquet`` shard of
the latent cache, holding what the read-and-crop stage takes (the file, its bucket, intermediary
size, crop and mask file: :class:`~raytuner.cache.rows.LatentTodo`). The index points the image's
sample at that row, so the plan and the captions read as for any cache.

A training worker that meets a pending row encodes it (``raytuner.batches.ondemand``) and, for
``vae_cache_ondemand``, writes the latent back as an ordinary ``bucket=<b>/part-*.parquet`` shard
with the cache's encoder key: the readers of later epochs and runs merge those shards, and a later
build adopts them as the rows of an interrupted build (:func:`~raytuner.cache.folders.adopt_orphans`),
so an image encoded on a worker is never encoded again. Latent shards keep their format: a cache
without pending rows is what it always was.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from raytuner.cache import format as fmt
from raytuner.cache.rows import DatasetWork, LatentTodo, latent_todo
from raytuner.cache.settings import EncoderIdentity
from raytuner.config.datasets import DatasetConfig
from raytuner.config.run import RunConfig

logger = logging.getLogger(__name__)

PENDING_PREFIX = "pending-"
PENDING_KIND = "pending"
PENDING_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "dataset_id": pa.string(),
    "path": pa.string(),
    "source": pa.string(),
    "bucket": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "inter_w": pa.int32(),
    "inter_h": pa.int32(),
    "left": pa.int32(),
    "top": pa.int32(),
    "original_w": pa.int32(),
    "original_h": pa.int32(),
    "mask_dataset_id": pa.string(),
    "mask_path": pa.string(),
}
PENDING_SCHEMA = pa.schema(PENDING_COLUMNS)


def encodes_on_workers(run: RunConfig, dataset: DatasetConfig) -> bool:
    """Whether the training workers encode this dataset's latents instead of the cache build.

    SimpleTuner's config.json ``vae_cache_ondemand`` applies to every dataset, the dataset key to
    its own; ``vae_cache_clear_each_epoch`` re-encodes every epoch, which only workers can do.
    Held-out eval datasets are always encoded by the build (evaluation runs no VAE).
    """
    if dataset.dataset_type != "image":
        return False
    return (
        run.training.data.vae_cache_ondemand
        or dataset.vae_cache_ondemand
        or dataset.vae_cache_clear_each_epoch
    )


def _still_pending(item: DatasetWork, wanted: dict[str, LatentTodo]) -> dict[str, dict[str, Any]]:
    """The committed pending rows of ``wanted`` keys whose image and mask files are where they were
    (the content key holds the bytes and the crop, not where the file lives)."""
    kept: dict[str, dict[str, Any]] = {}
    for shard in sorted({location["shard"] for location in item.pending.values()}):
        try:
            files = fmt.read_shard_columns(item.cache, shard, ["key", "path", "mask_path"]).to_pylist()
        except (OSError, pa.ArrowException):
            continue  # gone or unreadable: its images get pending rows again
        for row in files:
            entry = wanted.get(row["key"])
            location = item.pending.get(row["key"])
            if (
                entry is not None
                and location is not None
                and location["shard"] == shard
                and (row["path"], row["mask_path"]) == (entry["path"], entry["mask_path"])
            ):
                kept[row["key"]] = location
    return kept


def is_pending_shard(relative: str) -> bool:
    return posixpath.basename(relative).startswith(PENDING_PREFIX)


def split_pending(
    locations: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Committed locations (key -> location) as (encoded, pending)."""
    encoded = {key: row for key, row in locations.items() if not is_pending_shard(row["shard"])}
    pending = {key: row for key, row in locations.items() if is_pending_shard(row["shard"])}
    return encoded, pending


def leave_to_workers(
    run: RunConfig, work: Sequence[DatasetWork], identity: EncoderIdentity
) -> list[DatasetWork]:
    """Pending rows for the datasets the training workers encode; returns the datasets the build encodes."""
    up_front = []
    for item in work:
        on_workers = encodes_on_workers(run, item.dataset)
        if not on_workers:
            up_front.append(item)
        if item.listing is None:
            continue  # skip_file_discovery: the committed rows stay as they are, pending ones too
        if on_workers:
            defer_latents(item, identity, every_epoch=item.dataset.vae_cache_clear_each_epoch)
        else:
            item.pending = {}  # the build's VAE pass encodes them
    return up_front


def defer_latents(item: DatasetWork, identity: EncoderIdentity, *, every_epoch: bool) -> None:
    """Give each image of ``item`` the build would encode a pending row (``item.pending``).

    A pending row of an earlier build that still reads the same file is kept where it is (a run
    training from it may still read it); with ``every_epoch`` (vae_cache_clear_each_epoch) every
    image is pending, encoded ones included: its latents are redone each epoch, never read.
    """
    if every_epoch:
        item.existing = {}
    wanted = latent_todo([item])
    kept = _still_pending(item, {entry["key"]: entry for entry in wanted})
    todo = [entry for entry in wanted if entry["key"] not in kept]
    item.pending = kept
    if todo:
        table = pa.Table.from_pylist([dict(entry) for entry in todo], schema=PENDING_SCHEMA)
        relative = f"{PENDING_PREFIX}{fmt.new_build_id()}-{uuid.uuid4().hex[:12]}.parquet"
        shard, _ = fmt.write_shard(item.cache, relative, table, encoder_key=identity.key, kind=PENDING_KIND)
        keys = [entry["key"] for entry in todo]
        item.pending.update({location["key"]: location for location in fmt.shard_locations(keys, shard)})
    logger.info(
        "dataset '%s': %d image(s) left for the training workers to encode (%s)",
        item.dataset.id,
        len(item.pending),
        "vae_cache_clear_each_epoch" if every_epoch else "vae_cache_ondemand",
    )
