"""``raytuner cache``: the Ray Data pipeline that fills the latent and text caches.

Order of work, per run:

1. list every enabled image and eval dataset (local folder or ``s3://``) and probe the files not
   seen before in Ray tasks (hash, size, full decode, caption file); bad files are reported
   (:mod:`raytuner.cache.placing`);
2. give each image its aspect bucket and crop (:mod:`raytuner.data.buckets`) and its content key
   (file bytes + crop + resolution + VAE identity; :mod:`raytuner.cache.keys`);
3. encode what the caches lack: unique captions, validation prompts, the negative prompt, the
   prompt library and the empty prompt through the family's text side on one actor pool
   (:mod:`raytuner.cache.text`); the images read, decoded, resized and cropped in CPU tasks, then
   through the VAE on another actor pool (``vae_batch_size`` per call, one GPU per actor where the
   cluster has or can add GPUs), written as Parquet shards of one bucket each
   (:mod:`raytuner.cache.latents`);
4. commit each cache folder (index, then manifest) and drop shards no row points at any more;
   print a summary table and write a report of skipped files beside each latent cache.

A cache written by another VAE or text encoder is refused (``--rebuild`` moves past it by
deleting that cache's raytuner files); nothing is deleted otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raytuner.cache import format as fmt
from raytuner.cache.folders import adopt_orphans, load_committed
from raytuner.cache.format import CacheError
from raytuner.cache.latents import commit_latents, encode_latents
from raytuner.cache.ondemand import leave_to_workers, split_pending
from raytuner.cache.placing import place_images, probe_listings
from raytuner.cache.rows import DatasetWork, LatentRow
from raytuner.cache.settings import (
    EncoderIdentity,
    Encoders,
    bucket_settings,
    check_cache_settings,
    image_datasets,
    latent_cache_location,
    mask_dataset,
    model_path_of,
    skips,
)
from raytuner.cache.summary import CacheSummary
from raytuner.cache.text import TextWork, encode_text
from raytuner.config.datasets import DatasetConfig
from raytuner.config.run import RunConfig
from raytuner.data import discovery
from raytuner.errors import find_error
from raytuner.models.registry import get_family
from raytuner.ray_runtime import original_map_errors, ray_session

if TYPE_CHECKING:
    # Only annotations name the family class: importing it would load torch and diffusers
    # into every process that only reads or writes the cache's files.
    from raytuner.models.base import ModelFamily

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    encoder_actors: int | None = None  # VAE actor pool size; default: one per GPU, else 1
    rebuild: bool = False


def run_cache(run: RunConfig, options: BuildOptions, encoders: Encoders | None = None) -> CacheSummary:
    """Build the caches of a loaded run, on the connected Ray (or a local one); Ray errors unwrapped.

    ``encoders`` is :func:`~raytuner.cache.settings.check_cache_settings`' result when the caller
    has it already.
    """
    import ray

    if encoders is None:
        encoders = check_cache_settings(run)
    with ray_session(), original_map_errors():
        try:
            return build_cache(run, options, encoders)
        except ray.exceptions.RayError as error:
            inner = find_error(error)  # a RaytunerError of an encoding task, as it raised it
            if inner is not None:
                raise inner from None
            raise


def build_cache(
    run: RunConfig, options: BuildOptions = BuildOptions(), encoders: Encoders | None = None
) -> CacheSummary:
    """Bring every cache of ``run`` up to date; Ray must be connected (see ``ray_session``)."""
    started = time.monotonic()
    family_cls = get_family(run.training.model.model_family)
    model_path = model_path_of(run)
    encoders = encoders or check_cache_settings(run)
    vae_identity, text_identity = encoders.vae, encoders.text

    work = [
        open_latent_cache(run, dataset, family_cls, vae_identity, rebuild=options.rebuild)
        for dataset in image_datasets(run)
    ]
    listed = [item for item in work if item.listing is not None]
    if listed:
        probe_listings(listed)
    for item in listed:
        place_images(item, seed=run.seed, vae_key=vae_identity.key)

    text = TextWork.open(run, text_identity, work, rebuild=options.rebuild)
    if text.todo:
        text.written = encode_text(run, family_cls, model_path, text)
    # Text first: once a latent row is committed, its caption is always in the committed text cache.
    text.commit(family_cls)

    for item in work:
        item.stale_shards = {row["shard"] for row in (*item.existing.values(), *item.pending.values())}
    # images/s is measured over the image pipeline alone (read, crop, VAE, write), actor start-up included.
    encode_started = time.monotonic()
    up_front = leave_to_workers(run, work, vae_identity)
    encode_latents(run, family_cls, model_path, vae_identity, up_front, options.encoder_actors)
    encode_seconds = time.monotonic() - encode_started
    summaries = tuple(commit_latents(item, vae_identity) for item in work)
    return CacheSummary(
        datasets=summaries,
        prompts=len(text.prompts),
        prompts_encoded=len(text.written),
        text_cache=str(text.folder),
        seconds=time.monotonic() - started,
        encode_seconds=encode_seconds,
    )


def open_latent_cache(
    run: RunConfig,
    dataset: DatasetConfig,
    family_cls: type[ModelFamily],
    identity: EncoderIdentity,
    *,
    rebuild: bool,
) -> DatasetWork:
    """One dataset's cache as committed (identity checked), and its files listed unless skipped."""
    item = DatasetWork(
        dataset=dataset,
        settings=bucket_settings(dataset, run, family_cls),
        cache=latent_cache_location(run, dataset),
        mask=mask_dataset(run, dataset),
    )
    committed, manifest = load_committed(
        item.cache,
        kind="latents",
        encoder=identity,
        rebuild=rebuild,
        what=f"dataset '{dataset.id}' cache_dir_vae",
    )
    item.existing, item.pending = split_pending(
        {row["key"]: {k: row[k] for k in fmt.LOCATION_KEYS} for row in committed.values()}
    )
    item.encoded_before = manifest.encoded if manifest is not None else 0
    if skips(dataset, "vae") or skips(dataset, "aspect"):
        if not committed:
            raise CacheError(
                f"dataset '{dataset.id}': skip_file_discovery skips encoding, but {item.cache} holds no cache yet; "
                "remove skip_file_discovery for the first build"
            )
        cached_masks = manifest.extra.get("mask_dataset") if manifest is not None else None
        if cached_masks != dataset.conditioning_data:
            raise CacheError(
                f"dataset '{dataset.id}': skip_file_discovery skips encoding, but {item.cache} was cached "
                f"{'with masks from ' + repr(cached_masks) if cached_masks else 'without loss masks'} and "
                f"conditioning_data is now {dataset.conditioning_data!r}; remove skip_file_discovery for one build"
            )
        item.rows = {sample: LatentRow.committed(row, sample=sample) for sample, row in committed.items()}
        return item
    item.listing = discovery.list_dataset(dataset)
    if item.mask is not None:
        item.mask_listing = discovery.list_dataset(item.mask, captions=False)
    known = {row["shard"] for row in committed.values()}
    item.existing.update(adopt_orphans(item.cache, kind="latents", encoder=identity, known=known))
    return item
