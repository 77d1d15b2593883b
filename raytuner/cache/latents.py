"""The latent caches: the images a cache lacks read, cropped and encoded on a VAE actor pool,
then each dataset's index and manifest committed, its unused shards dropped and its report written."""

from __future__ import annotations

import functools
import json
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import pyarrow as pa

from raytuner.cache import format as fmt
from raytuner.cache import stages
from raytuner.cache.rows import LATENT_INDEX_COLUMNS, DatasetWork, LatentRow, latent_todo
from raytuner.cache.settings import EncoderIdentity
from raytuner.cache.summary import BucketSummary, DatasetSummary, shared_note
from raytuner.config.run import RunConfig
from raytuner.data import discovery
from raytuner.data.discovery import SkippedFile
from raytuner.placement import actor_gpus, cluster_facts, default_actor_count
from raytuner.storage import StorageError, describe_error, write_bytes_atomic

if TYPE_CHECKING:
    # Only annotations name the family class: importing it would load torch and diffusers
    # into every process that only reads or writes the cache's files.
    from raytuner.models.base import ModelFamily

logger = logging.getLogger(__name__)


def encode_latents(
    run: RunConfig,
    family_cls: type[ModelFamily],
    model_path: str,
    identity: EncoderIdentity,
    work: Sequence[DatasetWork],
    encoder_actors: int | None,
) -> None:
    """Encode every latent row the caches lack; what was written lands in each ``item.written``."""
    import ray

    todo = latent_todo(work)  # one bucket after another
    if not todo:
        return
    # GPUs when the cluster has them or its autoscaler can add them (the request adds them).
    cluster = cluster_facts()
    gpus = actor_gpus(cluster)
    actors = encoder_actors or default_actor_count(cluster)
    by_id = {item.dataset.id: item for item in work}
    sources = {item.dataset.id: discovery.dataset_location(item.dataset) for item in work}
    sources.update({item.mask.id: discovery.dataset_location(item.mask) for item in work if item.mask})
    local_sources = {dataset_id: location for dataset_id, location in sources.items() if location.is_local}
    logger.info("encoding %d image(s) with %d VAE actor(s)%s", len(todo), actors, " on GPUs" if gpus else "")
    build_id = fmt.new_build_id()
    write_rows = min(by_id[todo[0]["dataset_id"]].dataset.write_batch_size, 4096)
    dataset = (
        ray.data.from_items(list(todo))
        # Half a logical CPU each: decoding waits on storage as much as it computes, and distinct
        # resources keep Ray Data from fusing it into the VAE actors (it would then run serially there).
        .map(functools.partial(stages.load_and_crop, sources=sources), num_cpus=0.5)
        .map_batches(
            stages.VaeEncoder,
            fn_constructor_kwargs={
                "family_name": family_cls.name,
                "model_path": model_path,
                "revision": run.training.model.revision,
                "local_sources": local_sources,
                "data": run.training.data,
            },
            batch_size=run.training.data.vae_batch_size,
            compute=stages.actor_pool(actors),
            num_gpus=gpus,
        )
        .map_batches(
            functools.partial(
                stages.write_latent_shards,
                caches={item.dataset.id: item.cache for item in work},
                encoder_key_=identity.key,
                build_id=build_id,
            ),
            batch_size=write_rows,
            batch_format="pyarrow",
        )
    )
    batch: pa.Table  # batch_format="pyarrow"
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            item = by_id[result["dataset_id"]]
            if result["error"]:
                item.encode_skipped.extend(
                    SkippedFile(dataset_id=item.dataset.id, relative=source, reason=result["error"])
                    for source in _sources_sharing(item, result["source"])
                )
                continue
            item.bytes_by_bucket[result["bucket"]] += result["bytes"]
            item.vae_calls.update(result["vae_calls"])
            for location in fmt.shard_locations(result["keys"], result["shard"]):
                item.written[location["key"]] = location


def _sources_sharing(item: DatasetWork, source: str) -> list[str]:
    """Every file of the dataset whose latent row is the one encoded from ``source`` (itself included)."""
    key = next(row.key for row in item.rows.values() if row.source == source)
    return sorted(row.source for row in item.rows.values() if row.key == key)


def shared_latents(rows: Iterable[LatentRow]) -> list[list[str]]:
    """The groups of identical files that share one latent row, each group's files sorted."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row.key, []).append(row.source)
    return sorted(sorted(files) for files in groups.values() if len(files) > 1)


def commit_latents(item: DatasetWork, identity: EncoderIdentity) -> DatasetSummary:
    """Commit one dataset's latent cache (index, then manifest), drop its unused shards, report it."""
    skipped = item.skipped + item.encode_skipped
    # An encoded row wins over a pending one of the same key (raytuner.cache.ondemand).
    locations = {**item.pending, **item.existing, **item.written}
    live = [row for row in item.rows.values() if row.key in locations]
    # One index row per file: identical files point at the same latent row, each with its sample key.
    index_rows = [
        {**row.index_columns(), **{name: locations[row.key][name] for name in fmt.LOCATION_COLUMNS}}
        for row in live
    ]
    index = fmt.index_table(index_rows, LATENT_INDEX_COLUMNS)
    live_shards = {row["shard"] for row in index_rows}
    manifest = fmt.Manifest(
        kind="latents",
        encoder=identity.identity,
        encoder_key=identity.key,
        shards=len(live_shards),
        build=fmt.new_build_id(),
        encoded=item.encoded_before + len(item.written),
        extra={
            "dataset": item.dataset.id,
            "settings": asdict(item.settings),
            # Readers check this against conditioning_data: a run never trains unmasked by accident.
            **({"mask_dataset": item.mask.id} if item.mask is not None else {}),
            # Images the training workers encode: their latents are not in this cache (yet).
            **(
                {"pending": len({row.key for row in live if row.key in item.pending})} if item.pending else {}
            ),
        },
    )
    fmt.commit(item.cache, manifest, index)
    # Only now, with the new index committed, are shards no live row points at safe to remove.
    filesystem, root = item.cache.resolve()
    for shard in sorted((item.stale_shards | {loc["shard"] for loc in item.written.values()}) - live_shards):
        try:
            filesystem.delete_file(posixpath.join(root, shard))
        except (OSError, pa.ArrowException) as error:
            logger.warning(
                "could not remove unused shard %s", describe_error(item.cache.child(shard).uri, error)
            )
    buckets = Counter(row.bucket for row in live)
    # Rows, not files: identical files encoded in this build count once.
    encoded = Counter({row.key: row.bucket for row in live if row.key in item.written}.values())
    shared = shared_latents(live)
    shared_files = sum(len(files) for files in shared)
    notes = [shared_note(shared_files)] if shared_files else []
    report = _write_report(item, skipped, buckets, shared=shared, notes=notes)
    if skipped:
        logger.warning(
            "dataset '%s': %d file(s) skipped (listed in %s)", item.dataset.id, len(skipped), report
        )
    for note in notes:
        logger.info("dataset '%s': %s (listed in %s)", item.dataset.id, note, report)
    return DatasetSummary(
        dataset_id=item.dataset.id,
        cache=str(item.cache),
        images=len(live),
        encoded=sum(encoded.values()),
        skipped=len(skipped),
        shared=shared_files,
        bytes_written=sum(item.bytes_by_bucket.values()),
        vae_batches=len(item.vae_calls),
        buckets=tuple(
            BucketSummary(
                dataset_id=item.dataset.id,
                bucket=bucket,
                images=count,
                encoded=encoded.get(bucket, 0),
                bytes_written=item.bytes_by_bucket.get(bucket, 0),
            )
            for bucket, count in sorted(buckets.items(), key=lambda pair: _bucket_order(pair[0]))
        ),
        report=report,
    )


def _bucket_order(label: str) -> tuple[float, int]:
    width, _, height = label.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else (math.inf, 0)


def _write_report(
    item: DatasetWork,
    skipped: Sequence[SkippedFile],
    buckets: Mapping[str, int],
    *,
    shared: Sequence[Sequence[str]],
    notes: Sequence[str],
) -> str:
    report = {
        "dataset": item.dataset.id,
        "source": str(discovery.dataset_location(item.dataset)),
        "images": sum(buckets.values()),
        "buckets": dict(sorted(buckets.items())),
        "skipped": [{"file": entry.relative, "reason": entry.reason} for entry in skipped],
        # Not skipped: identical files each train as a sample, and only share their latents.
        "notes": list(notes),
        "shared_latents": [list(files) for files in shared],
    }
    filesystem, root = item.cache.resolve()
    try:
        write_bytes_atomic(
            filesystem, posixpath.join(root, fmt.REPORT_NAME), (json.dumps(report, indent=2) + "\n").encode()
        )
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(item.cache.child(fmt.REPORT_NAME).uri, error)) from None
    return str(item.cache.child(fmt.REPORT_NAME))
