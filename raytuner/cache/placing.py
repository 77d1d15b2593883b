"""Which files a build encodes, and how: every listed file not seen before probed on the cluster,
each image paired with its mask, then bucketed, cropped and keyed into a :class:`LatentRow`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from raytuner.cache import stages
from raytuner.cache.folders import read_discovery_index, write_discovery_index
from raytuner.cache.format import CacheError
from raytuner.cache.keys import caption_key, content_key, sample_key
from raytuner.cache.rows import DatasetWork, LatentRow, SourceFile
from raytuner.data import discovery
from raytuner.data.buckets import BucketSettings, aspect_limit_reason, crop_seed_for, place
from raytuner.data.captions import with_shuffles
from raytuner.data.discovery import DiscoveredMask, Probe, SkippedFile
from raytuner.data.problematic import delete_problematic
from raytuner.storage import describe_error

logger = logging.getLogger(__name__)

PROBE_BATCH = 32


def probe_listings(work: Sequence[DatasetWork]) -> None:
    """Probe every listed file not already in its dataset's discovery index, on the cluster."""
    import ray

    known: dict[str, dict[str, Probe]] = {item.dataset.id: read_discovery_index(item.cache) for item in work}
    todo: dict[str, dict[str, Any]] = {}
    for item in work:
        for listed in _listed_files(item):
            if listed.fingerprint not in known[item.dataset.id]:
                # Two datasets may list the same file (one folder at two resolutions): read it once.
                todo.setdefault(
                    listed.fingerprint, {name: getattr(listed, name) for name in stages.LISTED_FIELDS}
                )
    if todo:
        sources = {
            item.dataset.id: (discovery.dataset_location(item.dataset), item.dataset.caption_strategy)
            for item in work
        }
        for item in work:
            if item.mask is not None:
                # Masks carry no captions: "filename" makes the probe read none.
                sources[item.mask.id] = (discovery.dataset_location(item.mask), "filename")
        logger.info("reading %d new or changed file(s)", len(todo))
        dataset = ray.data.from_items(list(todo.values())).map_batches(
            functools.partial(stages.probe_batch, sources=sources), batch_size=PROBE_BATCH
        )
        found = discovery.probes_from_rows(dataset.iter_rows())
        for item in work:
            for listed in _listed_files(item):
                if listed.fingerprint in found:
                    known[item.dataset.id][listed.fingerprint] = found[listed.fingerprint]
    for item in work:
        assert item.listing is not None
        listed_fingerprints = {listed.fingerprint for listed in _listed_files(item)}
        probes = {fp: probe for fp, probe in known[item.dataset.id].items() if fp in listed_fingerprints}
        item.images, item.skipped = discovery.merge_probes(item.listing, probes)
        item.skipped = delete_problematic(item.listing, item.skipped)
        if item.mask_listing is not None:
            item.masks = pair_masks(item, probes)
        try:
            write_discovery_index(item.cache, probes.values())
        except (OSError, pa.ArrowException) as error:
            raise CacheError(describe_error(item.cache.child(discovery.DISCOVERY_INDEX).uri, error)) from None


def _listed_files(item: DatasetWork) -> list[discovery.ListedFile]:
    """The files a dataset's discovery reads: its images, and its masks (indexed in its own cache)."""
    files = list(item.listing.files) if item.listing else []
    return files + (list(item.mask_listing.files) if item.mask_listing else [])


def pair_masks(item: DatasetWork, probes: Mapping[str, Probe]) -> dict[str, DiscoveredMask]:
    """Each image's mask; an image without a usable one stops the build, as SimpleTuner stops at its batch."""
    assert item.mask is not None and item.mask_listing is not None
    masks, missing = discovery.pair_masks(item.images, item.mask_listing, probes)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CacheError(
            f"dataset '{item.dataset.id}': {len(missing)} image(s) without a usable mask in mask dataset "
            f"'{item.mask.id}' ({discovery.dataset_location(item.mask)}): {shown}; every image needs a mask "
            "with the same relative path (an all-white mask trains on the whole image)"
        )
    stretched = [
        image.relative
        for image in item.images
        if abs(masks[image.relative].width / masks[image.relative].height - image.width / image.height) > 0.01
    ]
    if stretched:
        logger.warning(
            "dataset '%s': %d mask(s) of another aspect ratio than their image are stretched to it, as "
            "SimpleTuner does: %s",
            item.dataset.id,
            len(stretched),
            ", ".join(stretched[:3]),
        )
    return masks


def too_small_reason(settings: BucketSettings) -> str:
    unit = "px edge" if settings.mode == "pixel" or settings.resolution_type == "pixel_area" else "megapixels"
    return f"smaller than minimum_image_size {settings.minimum_image_size:g} ({unit})"


def place_images(item: DatasetWork, *, seed: int, vae_key: str) -> None:
    """Bucket, crop and key every discovered image of one dataset: ``item.rows``, by sample key."""
    placed: set[str] = set()
    # SimpleTuner shuffles every caption strategy's captions but an instance prompt's.
    shuffle = item.dataset.caption_shuffle if item.dataset.caption_strategy != "instanceprompt" else None
    # By relative path, so which of two identical files keeps the content key never changes.
    for image in sorted(item.images, key=lambda image: image.relative):
        placement = place(
            item.settings, image.width, image.height, crop_seed=crop_seed_for(seed, image.sha256)
        )
        if placement is None:
            reason: str | None = too_small_reason(item.settings)
        else:
            reason = aspect_limit_reason(item.settings, placement)
        if reason is not None or placement is None:
            item.skipped.append(
                SkippedFile(dataset_id=item.dataset.id, relative=image.relative, reason=reason or "")
            )
            continue
        captions = with_shuffles(image.captions, shuffle, seed=seed)
        mask = item.masks.get(image.relative) if item.mask is not None else None
        key = content_key(image, placement, vae_key, mask)
        sample = sample_key(key, image.relative) if key in placed else key
        placed.add(key)
        item.rows[sample] = LatentRow(
            key=key,
            sample=sample,
            dataset_id=item.dataset.id,
            source=image.relative,
            caption_keys=tuple(caption_key(caption) for caption in captions),
            bucket=placement.label,
            width=placement.bucket[0],
            height=placement.bucket[1],
            file=SourceFile(
                path=image.path,
                placement=placement,
                captions=captions,
                original=(image.width, image.height),
                mask_path=mask.path if mask is not None else "",
            ),
        )
